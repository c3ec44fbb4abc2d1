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


def _origin_xattrs(lower: Real, st: os.stat_result) -> dict[str, bytes]:
    """What an upper copy records about its origin, so that it keeps its inode number."""
    return {schema.origin_xattr(st.st_mode): schema.format_origin(lower.layer.index, st.st_ino)}


class CopyUp:
    """Copies objects up; one instance per mount.

    A lower non-directory with several names (hard links) is copied once, into the index
    (``WORK/index/<layer>-<inode>``), and each of its names that is copied up becomes a hard link
    to that entry; names not yet copied up find the entry on lookup (:meth:`attach_index`). So the
    names stay one file, also across mounts. The entry carries the number of names in the merged
    view (``user.cowfs.nlink``), kept up to date by the namespace operations.
    """

    def __init__(self, stack: LayerStack, table: InodeTable, *, sync: bool = True) -> None:
        self.stack = stack
        self.table = table
        self.work = WorkDir(stack)
        self.index_fd = stack.index_fd
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
            if not inode.is_dir and inode.top.nlink > 1:
                real = self._index_entry(inode)
                self.link_name(real, parent_upper, name)
            else:
                real = self._copy_up(inode, parent_upper, name, with_data)
            inode.reals = (real, *inode.reals)
            return real

    def ensure_index(self, inode: Inode) -> Real | None:
        """Copy a hard-linked lower object into the index without giving it a name (so that its
        name count can be tracked before one of its names goes away). None if not hard-linked."""
        if inode.is_dir or (inode.upper is None and inode.top.nlink <= 1):
            return None
        with inode.copy_up_lock:
            upper = inode.upper
            if upper is None:
                upper = self._index_entry(inode)
                inode.reals = (upper, *inode.reals)
        return upper

    def attach_index(self, reals: tuple[Real, ...]) -> tuple[Real, ...]:
        """For a lower object with several names: its index entry on top, if it was copied up."""
        top = reals[0]
        if top.layer.is_upper or top.is_dir or top.nlink <= 1:
            return reals
        entry = realfs.open_path(self.index_fd, schema.index_name(top.layer.index,
                                                                   os.fstat(top.fd).st_ino))
        if entry is None:
            return reals
        return (Real(self.stack.upper, entry, os.fstat(entry).st_mode, indexed=True), *reals)

    def link_name(self, real: Real, parent: Real, name: str) -> None:
        """Give an index entry the name it is copied up under (parent times unchanged)."""
        parent_times = parent.stat()
        realfs.link(real.fd, parent.fd, name)
        realfs.utimens(parent.fd, parent_times.st_atime_ns, parent_times.st_mtime_ns)

    def _index_entry(self, inode: Inode) -> Real:
        lower = inode.top
        st = lower.stat()
        entry = schema.index_name(lower.layer.index, st.st_ino)
        fd = realfs.open_path(self.index_fd, entry)
        if fd is None:
            temp = self.work.temp_name()
            extra = {**_origin_xattrs(lower, st), schema.XATTR_NLINK: str(st.st_nlink).encode()}
            fd = self._build(lower, st, temp, with_data=True, extra=extra)
            try:
                realfs.rename(self.work.fd, temp, self.index_fd, entry, realfs.RENAME_NOREPLACE)
            except BaseException:
                os.close(fd)
                realfs.remove_tree(self.work.fd, temp)
                raise
        return Real(self.stack.upper, fd, st.st_mode, indexed=True)

    def _copy_up(self, inode: Inode, parent: Real, name: str, with_data: bool) -> Real:
        lower = inode.top
        st = lower.stat()
        temp = self.work.temp_name()
        log.debug("copy-up %r -> %s (data=%s)", inode, name, with_data)
        fd = self._build(lower, st, temp, with_data, _origin_xattrs(lower, st))
        try:
            parent_times = parent.stat()
            realfs.rename(self.work.fd, temp, parent.fd, name, realfs.RENAME_NOREPLACE)
        except BaseException:
            os.close(fd)
            realfs.remove_tree(self.work.fd, temp)
            raise
        # Copy-up is not a change of the parent as far as users can see.
        realfs.utimens(parent.fd, parent_times.st_atime_ns, parent_times.st_mtime_ns)
        return Real(self.stack.upper, fd, st.st_mode)

    def _build(self, lower: Real, st: os.stat_result, temp: str, with_data: bool,
               extra: dict[str, bytes]) -> int:
        """Build the copy at ``temp`` in the work dir; return an O_PATH descriptor for it."""
        wfd = self.work.fd
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            self._build_file(lower, st, temp, with_data, extra)
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
                self._finish(lower, st, fd, extra)
        except BaseException:
            os.close(fd)
            realfs.remove_tree(wfd, temp)
            raise
        return fd

    @staticmethod
    def _finish(lower: Real, st: os.stat_result, fd: int, extra: dict[str, bytes]) -> None:
        """xattrs, then owner and mode, then times: each step would undo what follows it."""
        copy_xattrs(lower, fd)
        for name, value in extra.items():
            try:
                realfs.setxattr(fd, name, value)
            except PermissionError:
                # trusted.* needs CAP_SYS_ADMIN: without it, a copied-up symlink or special file
                # gets a new inode number (a known limit of unprivileged mounts).
                log.debug("cannot record %s (not privileged)", name)
        copy_attributes(st, fd)

    def _build_file(self, lower: Real, st: os.stat_result, temp: str, with_data: bool,
                    extra: dict[str, bytes]) -> None:
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
                self._finish(lower, st, dst_path_fd, extra)
            finally:
                os.close(dst_path_fd)
            if self.sync:
                os.fsync(dst)
        except BaseException:
            os.close(dst)
            realfs.remove_tree(self.work.fd, temp)
            raise
        os.close(dst)


def adjust_nlink(real: Real, delta: int) -> None:
    """Count a name added to or removed from a hard-linked object copied up via the index."""
    value = realfs.getxattr(real.fd, schema.XATTR_NLINK)
    if value is None or not value.isdigit():
        return
    realfs.setxattr(real.fd, schema.XATTR_NLINK, str(max(int(value) + delta, 0)).encode())


def tracked_nlink(real: Real, st: os.stat_result) -> int | None:
    """The merged view's name count of an index entry (None for other objects). An entry that no
    upper name links to yet has st_nlink 1; one found through an upper name has more."""
    if not real.layer.is_upper or stat.S_ISDIR(st.st_mode) or (
            st.st_nlink <= 1 and not real.indexed):
        return None
    value = realfs.getxattr(real.fd, schema.XATTR_NLINK)
    return int(value) if value is not None and value.isdigit() else None
