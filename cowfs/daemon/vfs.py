"""The overlay filesystem model: what the merged view looks like, independent of FUSE.

:class:`Overlay` answers every request in terms of inodes and ``OSError`` errnos; the pyfuse3
adapter (:mod:`cowfs.daemon.operations`) only translates. A thin facade: the work is done by the
modules of each concept, as in the kernel's fs/overlayfs: lookup (:mod:`namei`), attributes
(:mod:`attrs`), copy-up (:mod:`copyup`), namespace changes (:mod:`namespace`), listings
(:mod:`readdir`), xattrs (:mod:`xattrs`), open files (:mod:`handles`).

Methods may block in system calls. The adapter runs the ones that may copy up file data (or read and
write it) in worker threads, so the rest of the filesystem keeps answering meanwhile; everything
here is therefore safe to call from several threads at once.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat

from ..core import realfs, schema
from ..core.layers import LayerStack
from ..core.metacopy import rebind
from ..core.refs import Descriptors
from ..core.resolve import Real, root_real
from ..core.workdir import recover
from . import attrs, fileattr, xattrs
from .attrs import Attributes, SetAttr
from .copyup import CopyUp
from .handles import FileHandle, real_flags, wants_write
from .inodes import Inode, InodeNumbers, InodeTable
from .namei import Held, Namei
from .namespace import Caller, Namespace
from .readdir import (
    NEEDS_LOOKUP,
    DirHandle,
    Listing,
    candidate_names,
    entry_type,
    layer_fds,
    listed_entry,
    plain_entry,
)
from .upperdata import Need, PartialData

log = logging.getLogger(__name__)

#: Descriptors the daemon keeps free of the cache: open files, listings, copy-ups, the kernel's
#: connection, pyfuse3's and Python's own.
_RESERVE = 96
#: The cache never needs more than this: beyond it, a walk's directories fit anyway.
_CACHE_MAX = 4096


def descriptor_budget(limit: int) -> int:
    """How many descriptors the cache of real objects may keep (:mod:`cowfs.core.refs`), under the
    soft limit ``limit``: half of what the reserve leaves, at least 32, at most 4,096."""
    return max(32, min(_CACHE_MAX, (limit - _RESERVE) // 2))


__all__ = ["Attributes", "Caller", "Overlay", "SetAttr"]


class Overlay:
    """One mounted overlay."""

    def __init__(self, stack: LayerStack, *, sync: bool = True, noatime: bool = False,
                 metacopy: bool = True, partial_min: int = 0, relocate: bool = False) -> None:
        self.stack = stack
        #: ``-o noatime``: reading an upper file does not change its access time either.
        self.noatime = noatime
        #: ``-o strictatime``: every read of an upper file sets its access time (the upper's own
        #: mount may not: relatime). Followed across remounts, as is ``noatime``.
        self.strictatime = False
        #: The mount is read-only (``mount -o remount,ro``): the kernel refuses writes itself,
        #: and reads and listings leave the upper's access times alone.
        self.mounted_read_only = False
        if not stack.read_only:
            recover(stack)
        #: The descriptors of the real objects inodes reach (:mod:`cowfs.core.refs`): a bounded
        #cache.
        self.descriptors = Descriptors(descriptor_budget(
            resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        self.table = InodeTable(tuple(root_real(layer) for layer in stack.all),
                                InodeNumbers(stack.all), self.descriptors)
        self.namei = Namei(stack, self.table, self.descriptors, metacopy=metacopy,
                           partial_min=partial_min)
        self.copy_up = CopyUp(stack.upper, stack.work, self.namei, sync=sync,
                              metacopy=metacopy, partial_min=partial_min)
        self.namespace = Namespace(stack.upper, stack.work, self.table, self.namei, self.copy_up)
        if relocate and not stack.read_only:
            # The layers were moved or copied on purpose: metacopy and partial files find their
            # data files by path again (their inode numbers changed with a copy).
            rebind(stack.upper.root_fd, self.table.root.reals, self.namei.trusted_uid)

    def close(self) -> None:
        """Release every inode (the root included) and the layers: after unmount, nothing of the
        mount holds a descriptor."""
        self.table.release_all()
        self.namei.close()
        self.stack.close()

    # --- lookups and the inode lifecycle ------------------------------------------------------

    def inode(self, number: int) -> Inode:
        return self.table.get(number)

    def lookup(self, parent: Inode, name: str) -> Inode | None:
        """The object at ``name``, counting one kernel lookup; None when there is none."""
        return self.namei.lookup(parent, name)

    def lookup_stat(self, parent: Inode, name: str
                    ) -> tuple[Inode, os.stat_result | None] | None:
        """:meth:`lookup`, and what :meth:`stat` of the inode found gives when it can be told
        without a system call (the lookup's own ``lstat``), else None."""
        return self.namei.lookup_stat(parent, name)

    def forget(self, number: int, count: int) -> None:
        """The kernel dropped ``count`` lookups of an inode; at zero its descriptors are closed."""
        self.table.forget(number, count)

    def unsaved_before_forget(self, number: int, count: int) -> PartialData | None:
        """The partial-file state of the inode that :meth:`forget` of ``count`` lookups would
        release, if it holds a map not on disk yet (:meth:`PartialData.save` writes it, which
        blocks)."""
        try:
            inode = self.table.get(number)
        except OSError:
            return None
        return self.copy_up.data.unsaved(inode) if inode.lookups <= count else None

    def request_done(self) -> None:
        """A request was answered (called on the request loop's thread): the cache of real
        objects' descriptors is trimmed to its size (:meth:`cowfs.core.refs.Descriptors.trim`)."""
        self.descriptors.trim()

    def unresolved_entry(self, directory: Inode, name: str) -> tuple[int, int]:
        """For listing a name whose lookup fails: its file type bits and the number its
        ``d_ino`` shows (1 when unknown)."""
        kind, layer, ino = entry_type(directory, name)
        return kind, self.table.numbers.number(layer, ino) if ino else 1

    def plain_entry(self, directory: Inode, name: str) -> tuple[int, int] | None:
        """File type bits and number of ``name`` for a listing without attributes, counting no
        lookup; None when the name is not visible. The number is the one a lookup gives."""
        found = plain_entry(directory, name)
        if found is None:
            return None
        if isinstance(found, tuple):
            kind, layer, ino = found
            return kind, self.table.numbers.number(layer, ino)
        child = self.lookup(directory, name)
        if child is None:
            return None
        try:
            return stat.S_IFMT(child.top.mode), child.number
        finally:
            self.forget(child.number, 1)

    def dotdot(self, directory: Inode) -> Inode:
        link = directory.any_link()
        return link[0] if link is not None else self.table.root

    # --- namespace ----------------------------------------------------------------------------

    def mknod(self, parent: Inode, name: str, mode: int, rdev: int, caller: Caller) -> Inode:
        return self.namespace.mknod(parent, name, mode, rdev, caller)

    def mkdir(self, parent: Inode, name: str, mode: int, caller: Caller) -> Inode:
        return self.namespace.mkdir(parent, name, mode, caller)

    def symlink(self, parent: Inode, name: str, target: str, caller: Caller) -> Inode:
        return self.namespace.symlink(parent, name, target, caller)

    def link(self, inode: Inode, parent: Inode, name: str) -> Inode:
        return self.namespace.link(inode, parent, name)

    def unlink(self, parent: Inode, name: str) -> None:
        self.namespace.unlink(parent, name)

    def rmdir(self, parent: Inode, name: str) -> None:
        self.namespace.rmdir(parent, name)

    def rename(self, old_parent: Inode, old_name: str, new_parent: Inode, new_name: str,
               flags: int) -> None:
        self.namespace.rename(old_parent, old_name, new_parent, new_name, flags)

    # --- xattrs -------------------------------------------------------------------------------

    def getxattr(self, inode: Inode, name: str) -> bytes | None:
        """The value of the user's attribute ``name``; None when there is none."""
        return xattrs.get_value(inode, name)

    def listxattr(self, inode: Inode) -> list[str]:
        return xattrs.list_names(inode)

    def setxattr(self, inode: Inode, name: str, value: bytes) -> None:
        xattrs.set_value(inode, name, value, self.copy_up)

    def removexattr(self, inode: Inode, name: str) -> None:
        xattrs.remove_value(inode, name, self.copy_up)

    # --- attributes ---------------------------------------------------------------------------

    def attributes(self, inode: Inode, seen: os.stat_result | None = None) -> Attributes:
        """What a reply says of ``inode``: one record, built in one place (:mod:`attrs`).
        ``seen``: its topmost object's ``lstat``, when the lookup that found it just made one
        (:meth:`lookup_stat`)."""
        return attrs.attributes(inode, self.stack.upper.root_fd, seen)

    def setattr(self, inode: Inode, change: SetAttr, handle: FileHandle | None) -> None:
        attrs.set_attributes(inode, change, handle, self.copy_up)

    @staticmethod
    def _open_upper(upper: Real, flags: int) -> int:
        try:
            return realfs.reopen(upper.fd, real_flags(flags))
        except PermissionError as e:
            # An append-only file opens for writing only with O_APPEND, which is otherwise left
            # out (the kernel sends explicit offsets; for an O_APPEND descriptor the end of the
            # file, where every write to an append-only file goes anyway).
            if e.errno != errno.EPERM or not flags & os.O_APPEND:
                raise
            return realfs.reopen(upper.fd, real_flags(flags) | os.O_APPEND)

    def readlink(self, inode: Inode) -> str:
        return realfs.readlink(inode.top.fd)

    # --- files --------------------------------------------------------------------------------

    def needs_copy_up(self, inode: Inode) -> bool:
        """Whether opening for writing (or truncating) copies data: no upper copy yet, or a
        metacopy one."""
        upper = inode.upper
        return upper is None or upper.metacopy

    def open(self, inode: Inode, flags: int) -> FileHandle:
        if not stat.S_ISREG(inode.top.mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if wants_write(flags):
            upper = self.copy_up.ensure(inode, Need.EMPTY if flags & os.O_TRUNC else Need.WRITE)
            fd = self._open_upper(upper, flags)
            try:
                self.copy_up.data.opened(inode, upper)  # a partial file's: some here, some below
            except BaseException:
                os.close(fd)
                raise
            return FileHandle(inode, fd, on_upper=True)
        self.copy_up.data.opened(inode, inode.top)
        data = inode.data  # a metacopy file's data is the lower file's
        # A lower file's access time never changes (the kernel's overlayfs mounts its lowers
        # noatime); an upper file's follows the upper's filesystem (relatime, usually), unless
        # the mount says otherwise: noatime or read-only (never), strictatime (every read, which
        # the adapter asks for: FileHandle.strict_atime).
        upper_atime = data.layer.is_upper and not self.noatime and not self.mounted_read_only
        if upper_atime and not self.strictatime:
            fd = realfs.reopen(data.fd, real_flags(flags))
        else:
            fd = realfs.reopen_noatime(data.fd, real_flags(flags))
        handle = FileHandle(inode, fd, on_upper=data.layer.is_upper)
        handle.strict_atime = upper_atime and self.strictatime
        return handle

    def create(self, parent: Inode, name: str, mode: int, caller: Caller) -> FileHandle:
        inode, fd = self.namespace.create(parent, name, mode, caller)
        return FileHandle(inode, fd, on_upper=True)

    # --- file attributes (chattr, lsattr) ------------------------------------------------------

    def get_fileattr(self, inode: Inode, handle: FileHandle | None, cmd: int, size: int) -> bytes:
        """``FS_IOC_GETFLAGS`` / ``FS_IOC_FSGETXATTR`` of the topmost copy (:mod:`fileattr`)."""
        if handle is not None:
            return fileattr.get(handle.read_fd(), cmd, size)
        fd = self._open_for_fileattr(inode.top)
        try:
            return fileattr.get(fd, cmd, size)
        finally:
            os.close(fd)

    def set_fileattr(self, inode: Inode, cmd: int, arg: bytes) -> None:
        """``FS_IOC_SETFLAGS`` / ``FS_IOC_FSSETXATTR`` on the upper copy, copied up first."""
        fileattr.check_set(cmd, arg)
        upper = self.copy_up.ensure(inode)
        fd = self._open_for_fileattr(upper)
        try:
            realfs.set_fileattr(fd, cmd, arg)
        finally:
            os.close(fd)

    @staticmethod
    def _open_for_fileattr(real: Real) -> int:
        # The kernel asks only about regular files and directories; opening anything else (a
        # device) could have effects.
        if not (stat.S_ISREG(real.mode) or stat.S_ISDIR(real.mode)):
            raise OSError(errno.ENOTTY, "no file attributes")
        return realfs.reopen(real.fd, fileattr.OPEN_FLAGS)

    # --- directories --------------------------------------------------------------------------

    def opendir(self, inode: Inode) -> DirHandle:
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return DirHandle(inode)

    def hidden_names(self, directory: Inode) -> tuple[str, ...]:
        return (schema.WORK_DIR_NAME,) if directory is self.table.root else ()

    def listing(self, directory: Inode) -> Listing:
        """``"."``, ``".."`` and every name ``directory`` shows: what readdir offsets index.

        A directory of the bottom layer alone (most of a large lower tree) lists its names as
        they are: nothing below it to hide or merge, and what cannot be shown (a whiteout left
        in it) is told by the entry's own lookup or ``fstatat`` when it is served, and skipped
        then. That saves a listing with attributes (``ls -l``, a walk) one ``fstatat`` per
        entry before its lookup makes the same one."""
        candidates = candidate_names(directory, self.hidden_names(directory),
                                     upper_noatime=self.noatime or self.mounted_read_only)
        reals = directory.reals
        if len(reals) == 1 and reals[0].layer.is_bottom and reals[0].mark is (
                schema.DirMark.PLAIN):
            return Listing([".", "..", *candidates], {})
        names, plain = [".", ".."], {}
        fds = layer_fds(directory)
        for name in candidates:
            listed, entry = listed_entry(directory, name, fds)
            if listed is NEEDS_LOOKUP:
                listed = self._looked_up(directory, name)
            if listed:
                names.append(name)
                if entry is not None:
                    plain[name] = entry
        return Listing(names, plain)

    def _looked_up(self, directory: Inode, name: str) -> bool:
        try:
            child = self.lookup(directory, name)
        except OSError:
            return True  # listed, without attributes (see readdir)
        if child is None:
            return False
        self.forget(child.number, 1)
        return True

    def held_listed(self, listing: Listing, directory: Inode, name: str) -> Held | None:
        """For an entry of a listing with attributes (readdirplus): the file type and number of
        ``name`` when the kernel holds its object under that name already, found as a listing
        without attributes finds them (:func:`plain_entry`: one ``fstatat``, no lookup); None
        when the entry needs a lookup (the object is not held so, or only a lookup can tell).

        The kernel then lists the name and keeps the dentry and attributes it has. A lookup
        counted for every entry of a listing that follows a walk of its files (``git status``
        does that) would double the walk's work in the daemon."""
        found = listing.plain.get(name)
        if found is None:
            try:
                plain = plain_entry(directory, name)
            except OSError:
                return None  # the lookup says what is wrong
            if not isinstance(plain, tuple):
                return None
            found = plain
        kind, layer, ino = found
        number = self.table.numbers.number(layer, ino)
        return Held(kind, number) if self.table.holds(number, directory, name) else None

    def listed_plain(self, listing: Listing, directory: Inode, name: str
                     ) -> tuple[int, int] | None:
        """:meth:`plain_entry`, from what ``listing`` found already where it did."""
        found = listing.plain.get(name)
        if found is None:
            return self.plain_entry(directory, name)
        kind, layer, ino = found
        return kind, self.table.numbers.number(layer, ino)

    def fsyncdir(self, inode: Inode) -> None:
        upper = inode.upper
        if upper is None:
            return  # nothing of it was written, so nothing to make durable
        fd = realfs.open_dir(upper.fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sync_upper(self) -> None:
        """Make everything written to the upper's filesystem durable (``syncfs``)."""
        fd = realfs.open_dir(self.stack.upper.root_fd)  # syncfs refuses an O_PATH descriptor
        try:
            realfs.syncfs(fd)
        finally:
            os.close(fd)

    def statfs(self) -> os.statvfs_result:
        """Statistics of the upper's filesystem: that is where writes go."""
        return os.statvfs(realfs.proc_path(self.stack.upper.root_fd))
