"""The overlay filesystem model: what the merged view looks like, independent of FUSE.

:class:`Overlay` answers every request in terms of inodes and ``OSError`` errnos; the pyfuse3
adapter (:mod:`cowfs.operations`) only translates. Modules by concept, as in the kernel's
fs/overlayfs: lookup (:mod:`resolve`), copy-up (:mod:`copyup`), namespace changes
(:mod:`namespace`), listings (:mod:`readdir`), xattrs (:mod:`xattrs`), open files (:mod:`handles`).

Methods may block in system calls. The adapter runs the ones that may copy up file data (or read and
write it) in worker threads, so the rest of the filesystem keeps answering meanwhile; everything
here is therefore safe to call from several threads at once.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from . import realfs, schema
from .copyup import CopyUp, tracked_nlink
from .handles import FileHandle, real_flags, wants_write
from .inodes import Inode, InodeNumbers, InodeTable
from .layers import LayerStack
from .namespace import Caller, Namespace
from .readdir import DirHandle
from .resolve import root_real

log = logging.getLogger(__name__)

__all__ = ["Caller", "Overlay", "SetAttr"]


@dataclass(frozen=True, slots=True)
class SetAttr:
    """The attribute changes of one setattr request; None means unchanged."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Overlay:
    """One mounted overlay."""

    def __init__(self, stack: LayerStack, *, sync: bool = True) -> None:
        self.stack = stack
        self.table = InodeTable(tuple(root_real(layer) for layer in stack.all),
                                InodeNumbers(stack.all))
        self.copy_up = CopyUp(stack, self.table, sync=sync)
        self.namespace = Namespace(stack, self.table, self.copy_up)
        self.copy_up.work.clean()

    def close(self) -> None:
        self.stack.close()

    # --- attributes ---------------------------------------------------------------------------

    def inode(self, number: int) -> Inode:
        return self.table.get(number)

    def stat(self, inode: Inode) -> os.stat_result:
        return inode.top.stat()

    def nlink(self, inode: Inode, st: os.stat_result) -> int:
        """Names in the merged view. The kernel reports 1 for merged directories: counting their
        subdirectories is not worth it. Hard links copied up via the index keep their own count."""
        if inode.is_merged_dir:
            return 1
        tracked = tracked_nlink(inode.top, st)
        return st.st_nlink if tracked is None else tracked

    def setattr(self, inode: Inode, change: SetAttr, handle: FileHandle | None) -> None:
        upper = self.copy_up.ensure(inode, with_data=change.size != 0)
        if change.size is not None:
            if handle is not None and handle.on_upper:
                os.ftruncate(handle.fd, change.size)
            else:
                realfs.truncate(upper.fd, change.size)
        if change.uid is not None or change.gid is not None:
            realfs.chown(upper.fd, -1 if change.uid is None else change.uid,
                         -1 if change.gid is None else change.gid)
        if change.mode is not None:
            realfs.chmod(upper.fd, stat.S_IMODE(change.mode))
        if change.atime_ns is not None or change.mtime_ns is not None:
            st = upper.stat()
            realfs.utimens(upper.fd,
                           st.st_atime_ns if change.atime_ns is None else change.atime_ns,
                           st.st_mtime_ns if change.mtime_ns is None else change.mtime_ns)

    def readlink(self, inode: Inode) -> str:
        return realfs.readlink(inode.top.fd)

    # --- files --------------------------------------------------------------------------------

    def needs_copy_up(self, inode: Inode) -> bool:
        return inode.upper is None

    def open(self, inode: Inode, flags: int) -> FileHandle:
        if not stat.S_ISREG(inode.top.mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if wants_write(flags):
            upper = self.copy_up.ensure(inode, with_data=not flags & os.O_TRUNC)
            return FileHandle(inode, realfs.reopen(upper.fd, real_flags(flags)), on_upper=True)
        top = inode.top
        fd = realfs.reopen(top.fd, real_flags(flags))
        return FileHandle(inode, fd, on_upper=top.layer.is_upper)

    def create(self, parent: Inode, name: str, mode: int, caller: Caller) -> FileHandle:
        inode, fd = self.namespace.create(parent, name, mode, caller)
        return FileHandle(inode, fd, on_upper=True)

    # --- directories --------------------------------------------------------------------------

    def opendir(self, inode: Inode) -> DirHandle:
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return DirHandle(inode)

    def hidden_names(self, directory: Inode) -> tuple[str, ...]:
        return (schema.WORK_DIR_NAME,) if directory is self.table.root else ()

    def fsyncdir(self, inode: Inode) -> None:
        upper = inode.upper
        if upper is None:
            return  # nothing of it was written, so nothing to make durable
        fd = realfs.open_dir(upper.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def statfs(self) -> os.statvfs_result:
        """Statistics of the upper's filesystem: that is where writes go."""
        return os.statvfs(realfs.proc_path(self.stack.upper.root_fd))
