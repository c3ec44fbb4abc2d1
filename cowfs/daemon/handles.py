"""Open files: a real descriptor per open, and what happens when the object is copied up meanwhile.

A file opened read-only from a lower layer keeps reading the lower copy until someone copies it up
with its data (a metadata-only copy-up leaves the data in the lower file,
:mod:`cowfs.core.metacopy`); after that, reads switch to the upper copy (as the kernel's overlayfs
does since Linux 4.19), so a reader never sees stale data after another process wrote the file.

An unlinked file stays readable and writable through its open handles: they hold the real
descriptor.

:meth:`FileHandle.read_cached` serves a read only if it cannot block (``RWF_NOWAIT``: the data is
in the page cache), so the adapter can answer it without the cost of a worker thread.

Known limits: ``read_cached`` declines every read on filesystems without non-blocking buffered reads
(tmpfs, for one); those reads always take the worker-thread path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading

from ..core import inline, realfs
from .inodes import Inode

#: Open flags passed on to the real file; the others (O_CREAT, O_EXCL, O_APPEND, O_DIRECT, ...) are
#: the kernel's business, which hands cowfs explicit offsets.
PASSED_FLAGS = os.O_TRUNC | os.O_SYNC | os.O_DSYNC


class FileHandle:
    """One open of a regular file."""

    __slots__ = ("_lock", "_nowait", "_stale_fds", "_sync", "direct", "fd", "inode", "on_upper",
                 "strict_atime")

    def __init__(self, inode: Inode, fd: int, on_upper: bool) -> None:
        self.inode = inode
        self.fd = fd
        self.on_upper = on_upper
        self._stale_fds: list[int] = []
        self._lock = threading.Lock()
        self._nowait = True  # until the real filesystem says it has no non-blocking reads
        self._sync: bool | None = None
        #: Every read sets the upper file's access time (``-o strictatime``: :meth:`accessed`).
        self.strict_atime = False
        #: Opened ``O_DIRECT``: every write runs inline (see ``Operations.write``).
        self.direct = False

    def read_fd(self) -> int:
        """The descriptor to read from: the upper copy as soon as there is one."""
        if not self.on_upper and self.inode.alive:
            upper = self.inode.upper
            if upper is not None and not upper.metacopy:
                with self._lock:
                    if not self.on_upper:
                        # Older reads in other threads may still use the old descriptor: it is
                        # closed on release, never while they might read it.
                        self._stale_fds.append(self.fd)
                        self.fd = realfs.reopen(upper.fd, os.O_RDONLY)
                        self.on_upper = True
        return self.fd

    def read(self, offset: int, size: int) -> bytes:
        opened = self.inode.partial
        if opened is not None:
            return opened.read(offset, size)
        return os.pread(self.read_fd(), size, offset)

    def read_local(self, offset: int, buf: memoryview) -> int | None:
        """Fill ``buf`` with a blocking read if the file is on a local block device (a read from
        the disk takes less than handing it to a worker thread); None if it is not (a network
        or FUSE filesystem may take long, and would hold up every other request meanwhile)."""
        if self.inode.partial is not None:
            return None
        fd = self.read_fd()
        if not inline.is_local(fd):  # anonymous device: tmpfs, FUSE, NFS, ...
            return None
        return os.preadv(fd, [buf], offset)

    def read_cached(self, offset: int, buf: memoryview) -> int | None:
        """Fill ``buf`` if the page cache holds all of it: the bytes read, or None if reading
        might block (the data is not cached, or only part of it is)."""
        if not self._nowait or self.inode.partial is not None:
            return None
        fd = self.read_fd()
        try:
            n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:
                raise
            self._nowait = False
            return None
        # A short read is either the end of the file or the end of what is cached.
        if n < len(buf) and offset + n < os.fstat(fd).st_size:
            return None
        return n

    def accessed(self) -> None:
        """Set the access time after a read, as a strictatime mount does (the real descriptor is
        open ``O_NOATIME``, so that reads alone change nothing)."""
        realfs.touch_atime(self.fd)

    @property
    def writes_sync(self) -> bool:
        """Whether every write waits for the disk (opened ``O_SYNC`` or ``O_DSYNC``)."""
        if self._sync is None:
            self._sync = bool(fcntl.fcntl(self.fd, fcntl.F_GETFL) & os.O_DSYNC)
        return self._sync

    def write(self, offset: int, data: bytes) -> int:
        """Write at ``offset``. Into a partial file, a write that brings blocks up records the
        map before it returns (its data on disk first): ``close`` reports nothing (cowfs answers
        no FLUSH), so this write is where a failure to record them is reported, and its data is
        then not the file's (:meth:`PartialFile.persist`)."""
        opened = self.inode.partial
        if opened is None:
            return os.pwrite(self.fd, data, offset)
        n = opened.write(offset, data)
        if self.writes_sync:
            opened.fsync(datasync=True)
        elif opened.dirty:
            opened.persist()
        return n

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2), in any mode the upper's filesystem has. The kernel sends it only on a
        handle open for writing, which is on the upper copy (opening it copied the file up)."""
        if not self.on_upper:
            raise OSError(errno.EBADF, "not open for writing")
        opened = self.inode.partial
        if opened is not None:
            opened.allocate(mode, offset, length)
        else:
            realfs.fallocate(self.fd, mode, offset, length)

    def seek(self, offset: int, whence: int) -> int:
        """lseek(2) with ``SEEK_DATA`` or ``SEEK_HOLE`` (the kernel answers the other whences
        itself): where the real file has data or a hole. Reads use explicit offsets, so moving
        the real descriptor's position disturbs nothing."""
        opened = self.inode.partial
        if opened is not None:
            return opened.seek(offset, whence)
        return os.lseek(self.read_fd(), offset, whence)

    @property
    def unrecorded(self) -> bool:
        """Whether the file is a partial one with blocks whose map is not on disk yet."""
        opened = self.inode.partial
        return self.on_upper and opened is not None and opened.dirty

    def record(self) -> None:
        """Put a partial file's map on disk (its data first): at release, if a write left it
        unrecorded (a truncation whose record failed; see :mod:`partial`)."""
        opened = self.inode.partial
        if opened is not None:
            opened.persist()

    def fsync(self, datasync: bool) -> None:
        opened = self.inode.partial
        if opened is not None:
            opened.fsync(datasync)
        elif datasync:
            os.fdatasync(self.fd)
        else:
            os.fsync(self.fd)

    def close(self) -> None:
        for fd in (self.fd, *self._stale_fds):
            os.close(fd)


def real_flags(flags: int) -> int:
    return (flags & os.O_ACCMODE) | (flags & PASSED_FLAGS)


def wants_write(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
