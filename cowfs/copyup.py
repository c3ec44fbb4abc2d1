"""Copy-up: promoting a lower object into the upper layer (the kernel's fs/overlayfs/copy_up.c).

The copy is built in the work directory — data first, then xattrs, then owner, mode and times, then
fsync — and renamed into place, parents first. A crash therefore never leaves a half-copied object
visible; leftovers in the work directory are removed at the next mount.

Data is copied by the kernel: a reflink (FICLONE) where the upper supports it, else
``copy_file_range`` over the data segments only (holes stay holes), else ``sendfile``. It never
passes through Python buffers. Callers run copy-ups of regular files in worker threads; the
per-inode lock makes concurrent openers share one copy-up.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import stat

from . import realfs, schema
from .inodes import Inode, InodeTable
from .layers import LayerStack
from .resolve import Real

log = logging.getLogger(__name__)

FICLONE = 0x40049409
_NO_REFLINK = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF)
_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


class WorkDir:
    """Unique temporary names in the work directory."""

    def __init__(self, stack: LayerStack) -> None:
        self.fd = stack.work_fd
        self._counter = itertools.count()

    def temp_name(self) -> str:
        return f"#{os.getpid()}.{next(self._counter)}"

    def clean(self) -> None:
        """Remove what an interrupted copy-up or removal left behind."""
        dfd = realfs.open_dir(self.fd)
        try:
            names = os.listdir(dfd)
        finally:
            os.close(dfd)
        for name in names:
            log.info("removing leftover %r from the work directory", name)
            realfs.remove_tree(self.fd, name)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy a file's data in the kernel, keeping holes."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return
    except OSError as e:
        if e.errno not in _NO_REFLINK:
            raise
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        _copy_range(src, dst, start, end)
        pos = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, end - pos, pos, pos)
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
            os.lseek(dst, pos, os.SEEK_SET)
            n = os.sendfile(dst, src, pos, end - pos)
        if n == 0:  # the source shrank under us; the final ftruncate fixes the size
            return
        pos += n


def copy_xattrs(src: Real, dst_fd: int) -> None:
    """Copy the user's xattrs (never the layer's own metadata) onto ``dst_fd``."""
    for name in realfs.listxattr(src.fd):
        if not schema.is_copied_on_copy_up(name):
            continue
        value = realfs.getxattr(src.fd, name)
        if value is None:
            continue
        try:
            realfs.setxattr(dst_fd, name, value)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP):
                raise
            log.warning("copy-up: cannot copy xattr %s: %s", name, e.strerror)


def copy_attributes(st: os.stat_result, fd: int) -> None:
    """Owner before mode (chown clears set-id bits), times last (everything else changes them)."""
    realfs.chown(fd, st.st_uid, st.st_gid)
    if not stat.S_ISLNK(st.st_mode):
        realfs.chmod(fd, stat.S_IMODE(st.st_mode))
    realfs.utimens(fd, st.st_atime_ns, st.st_mtime_ns)


class CopyUp:
    """Copies objects up; one instance per mount."""

    def __init__(self, stack: LayerStack, table: InodeTable, *, sync: bool = True) -> None:
        self.stack = stack
        self.table = table
        self.work = WorkDir(stack)
        self.sync = sync

    def ensure(self, inode: Inode, *, with_data: bool = True) -> Real:
        """The upper copy of ``inode``, copying it (and its parents) up first if needed."""
        upper = inode.upper
        if upper is not None:
            return upper
        with inode.copy_up_lock:
            upper = inode.upper
            if upper is not None:
                return upper
            link = inode.any_link()
            if link is None:
                raise OSError(errno.ESTALE, "object has no name left to copy up to")
            parent, name = link
            parent_upper = self.ensure(parent)
            return self._copy_up(inode, parent_upper, name, with_data)

    def _copy_up(self, inode: Inode, parent: Real, name: str, with_data: bool) -> Real:
        lower = inode.top
        st = lower.stat()
        temp = self.work.temp_name()
        log.debug("copy-up %r -> %s (data=%s)", inode, name, with_data)
        fd = self._build(lower, st, temp, with_data)
        try:
            real = Real(self.stack.upper, fd, st.st_mode)
            self.table.add_key(inode, real)
            parent_times = parent.stat()
            realfs.rename(self.work.fd, temp, parent.fd, name, realfs.RENAME_NOREPLACE)
        except BaseException:
            os.close(fd)
            realfs.remove_tree(self.work.fd, temp)
            raise
        # Copy-up is not a change of the parent as far as users can see.
        realfs.utimens(parent.fd, parent_times.st_atime_ns, parent_times.st_mtime_ns)
        if not inode.is_dir:
            self.table.drop_key(inode, lower)
        inode.reals = (real, *inode.reals)
        return real

    def _build(self, lower: Real, st: os.stat_result, temp: str, with_data: bool) -> int:
        """Build the copy at ``temp`` in the work dir; return an O_PATH descriptor for it."""
        wfd = self.work.fd
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            self._build_file(lower, st, temp, with_data)
        elif kind == stat.S_IFDIR:
            realfs.mkdir(wfd, temp, 0o700)
        elif kind == stat.S_IFLNK:
            realfs.symlink(wfd, temp, realfs.readlink(lower.fd))
        else:
            realfs.mknod(wfd, temp, st.st_mode, st.st_rdev)
        fd = realfs.open_path(wfd, temp)
        assert fd is not None, "the object was just created in the private work directory"
        try:
            if kind != stat.S_IFREG:
                copy_xattrs(lower, fd)
                copy_attributes(st, fd)
        except BaseException:
            os.close(fd)
            realfs.remove_tree(wfd, temp)
            raise
        return fd

    def _build_file(self, lower: Real, st: os.stat_result, temp: str, with_data: bool) -> None:
        dst = realfs.create_file(self.work.fd, temp, 0o600, os.O_WRONLY)
        try:
            if with_data and st.st_size:
                src = realfs.reopen(lower.fd, os.O_RDONLY)
                try:
                    copy_data(src, dst, st.st_size)
                finally:
                    os.close(src)
            dst_path_fd = realfs.open_path(self.work.fd, temp)
            assert dst_path_fd is not None
            try:
                copy_xattrs(lower, dst_path_fd)
                copy_attributes(st, dst_path_fd)
            finally:
                os.close(dst_path_fd)
            if self.sync:
                os.fsync(dst)
        except BaseException:
            os.close(dst)
            realfs.remove_tree(self.work.fd, temp)
            raise
        os.close(dst)
