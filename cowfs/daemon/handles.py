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
from typing import Protocol

from ..core import inline, realfs
from .inodes import Inode
from .upperdata import live

#: Open flags passed on to the real file; the others (O_CREAT, O_EXCL, O_APPEND, O_DIRECT, ...) are
#: the kernel's business, which hands cowfs explicit offsets.
PASSED_FLAGS = os.O_TRUNC | os.O_SYNC | os.O_DSYNC


class FileData(Protocol):
    """What an open file reads and writes through: one interface for a plain file (:class:`_Plain`,
    the handle's own descriptor) and a partial one
    (:class:`cowfs.daemon.upperdata.PartialData`, the inode's), so that a handle never asks
    which of the two it has."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes, *, sync: bool) -> int: ...

    def allocate(self, mode: int, offset: int, length: int) -> None: ...

    def seek(self, offset: int, whence: int) -> int: ...

    def fsync(self, datasync: bool) -> None: ...

    @property
    def unsaved(self) -> bool: ...

    def persist(self) -> None: ...


class _Plain:
    """A plain file's data: in one real file, through the handle's descriptor (for reads the
    upper copy's as soon as there is one, :meth:`FileHandle.read_fd`)."""

    __slots__ = ("_handle",)

    def __init__(self, handle: FileHandle) -> None:
        self._handle = handle

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self._handle.read_fd(), size, offset)

    def write(self, offset: int, data: bytes, *, sync: bool) -> int:
        return os.pwrite(self._handle.fd, data, offset)

    def allocate(self, mode: int, offset: int, length: int) -> None:
        realfs.fallocate(self._handle.fd, mode, offset, length)

    def seek(self, offset: int, whence: int) -> int:
        return os.lseek(self._handle.read_fd(), offset, whence)

    def fsync(self, datasync: bool) -> None:
        if datasync:
            os.fdatasync(self._handle.fd)
        else:
            os.fsync(self._handle.fd)

    @property
    def unsaved(self) -> bool:
        return False  # every write is in the real file

    def persist(self) -> None:
        pass


class FileHandle:
    """One open of a regular file."""

    __slots__ = ("_lock", "_nowait", "_plain", "_stale_fds", "_sync", "direct", "fd", "inode",
                 "on_upper", "strict_atime")

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
        self._plain = _Plain(self)

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

    def _data(self) -> FileData:
        """What this open reads and writes through: the inode's partial-file record while it has
        a live one (:mod:`cowfs.daemon.upperdata`), else this handle's own descriptor (made
        once: a view made per call cost a write 0.2 µs more; the reference cycle it forms with
        the handle is the collector's, the descriptors are closed by :meth:`close`)."""
        record = live(self.inode)
        return self._plain if record is None else record

    @property
    def combined(self) -> bool:
        """Whether the file's data is combined from two real files (a partial file): its reads
        and writes may copy blocks and wait for the disk, and the page cache of the real
        descriptor says nothing about them."""
        return live(self.inode) is not None

    def read(self, offset: int, size: int) -> bytes:
        return self._data().read(offset, size)

    def read_local(self, offset: int, buf: memoryview) -> int | None:
        """Fill ``buf`` with a blocking read if the file is on a local block device (a read from
        the disk takes less than handing it to a worker thread); None if it is not (a network
        or FUSE filesystem may take long, and would hold up every other request meanwhile)."""
        if self.combined:
            return None
        fd = self.read_fd()
        if not inline.is_local(fd):  # anonymous device: tmpfs, FUSE, NFS, ...
            return None
        return os.preadv(fd, [buf], offset)

    def read_cached(self, offset: int, buf: memoryview) -> int | None:
        """Fill ``buf`` if the page cache holds all of it: the bytes read, or None if reading
        might block (the data is not cached, or only part of it is)."""
        if not self._nowait or self.combined:
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
        """Write at ``offset`` (into a partial file, the write records the map before it returns,
        :meth:`cowfs.daemon.upperdata.PartialData.write`)."""
        return self._data().write(offset, data, sync=self.writes_sync)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2), in any mode the upper's filesystem has. The kernel sends it only on a
        handle open for writing, which is on the upper copy (opening it copied the file up)."""
        if not self.on_upper:
            raise OSError(errno.EBADF, "not open for writing")
        self._data().allocate(mode, offset, length)

    def seek(self, offset: int, whence: int) -> int:
        """lseek(2) with ``SEEK_DATA`` or ``SEEK_HOLE`` (the kernel answers the other whences
        itself): where the real file has data or a hole. Reads use explicit offsets, so moving
        the real descriptor's position disturbs nothing."""
        return self._data().seek(offset, whence)

    @property
    def unrecorded(self) -> bool:
        """Whether the file is a partial one with blocks whose map is not on disk yet."""
        return self.on_upper and self._data().unsaved

    def record(self) -> None:
        """Put a partial file's map on disk (its data first): at release, if a write left it
        unrecorded (a truncation whose record failed; see :mod:`cowfs.core.partial`)."""
        self._data().persist()

    def fsync(self, datasync: bool) -> None:
        self._data().fsync(datasync)

    def close(self) -> None:
        for fd in (self.fd, *self._stale_fds):
            os.close(fd)


def real_flags(flags: int) -> int:
    return (flags & os.O_ACCMODE) | (flags & PASSED_FLAGS)


def wants_write(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
