"""Copy-up of only the written ranges: *partial* files.

A lower regular file of at least ``-o partial_copyup=SIZE`` bytes (64 MiB by default) that is opened
for writing or truncated is copied up as a metacopy file (:mod:`cowfs.core.metacopy`: sparse, no
data) that also carries a **data map** (``user.cowfs.datamap``, :class:`DataMap`). The map says
which blocks of the file the upper copy holds; every other byte comes from the lower file (the *data
file*, found as a metacopy file's is), or is zero past the end of what the lower file still
provides. The first write into a block copies that block's old content from the lower file into
the upper copy (unless the write covers it whole), then the write lands in the upper copy, and the
block joins the map. Reads combine the two.

The map on disk only ever grows after the data it adds is on disk: :meth:`PartialFile.persist`
runs ``fdatasync`` on the upper copy before it writes the map, and it runs in every write that
brings blocks up, before the write is answered
(:meth:`cowfs.daemon.upperdata.PartialData.write`: cowfs answers no ``FLUSH``, so ``close``
could not report a failure), on ``fsync`` and at unmount. A
crash loses at most the write requests in flight, and nothing else: blocks not in the map still
read from the lower file, whatever the upper copy holds there. The price is an ``fdatasync`` per
write that brings blocks up (at most one per 64 KiB block; a write into blocks already up costs
none).

A file whose map would grow past :data:`MAX_MAP_BYTES`, or that needs its data whole (a ``chown``
to an owner the metacopy rule refuses, ``fallocate`` modes that move or zero ranges), is
*completed*: the missing blocks are copied in, ``fdatasync``, and the map and the mark are removed
(the commit point). It is then an ordinary upper file. So is a file every block of which has come
up, at its next ``persist``.

Where a clone is as cheap (the upper's filesystem has reflinks and holds the lower file too),
copy-up clones the whole file instead (:mod:`cowfs.daemon.copyup`).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import io
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from . import realfs, schema

log = logging.getLogger(__name__)

#: The unit of copy-up: a write copies the blocks it touches (recorded in every map).
BLOCK = 1 << 16
#: A map longer than this (encoded) completes the file instead: it must fit in one xattr block
#: of every upper filesystem (ext4's is 4 KiB, shared with the file's other xattrs).
MAX_MAP_BYTES = 2048
#: The default of ``-o partial_copyup``.
DEFAULT_MIN_SIZE = 64 << 20

_VERSION = b"1"


@dataclass(frozen=True, slots=True)
class DataMap:
    """Which blocks of a partial file the upper copy holds (``user.cowfs.datamap``).

    Encoded as ASCII: ``1 <block> <lower size> <valid> <ranges>``, where ``<ranges>`` is ``-`` or
    a comma-separated list of ``<first>-<end>`` block ranges (end exclusive, sorted, neither
    overlapping nor touching). ``<lower size>`` is the data file's size (it must still have it);
    ``<valid>`` is how many of its bytes the file still shows (a truncation below it lowers it):
    a byte at offset ``o`` below the file's size reads from the upper copy if its block is in the
    map, else from the data file if ``o < valid``, else as zero.
    """

    block: int
    lower_size: int
    valid: int
    ranges: tuple[tuple[int, int], ...] = ()

    @classmethod
    def empty(cls, lower_size: int) -> DataMap:
        return cls(BLOCK, lower_size, lower_size)

    def encode(self) -> bytes:
        ranges = ",".join(f"{a}-{b}" for a, b in self.ranges) or "-"
        return b"%s %d %d %d %s" % (_VERSION, self.block, self.lower_size, self.valid,
                                    ranges.encode())

    @classmethod
    def decode(cls, value: bytes) -> DataMap:
        """Parse a stored map; ValueError, saying why, for anything malformed."""
        parts = value.split(b" ")
        if len(parts) != 5 or parts[0] != _VERSION:
            raise ValueError("not a version-1 data map")
        try:
            block, lower_size, valid = (int(p) for p in parts[1:4])
        except ValueError:
            raise ValueError("data map with a malformed number") from None
        if block < 4096 or block > 1 << 24 or block & (block - 1):
            raise ValueError(f"data map with block size {block}")
        if not 0 <= valid <= lower_size:
            raise ValueError(f"data map shows {valid} of {lower_size} lower bytes")
        ranges: list[tuple[int, int]] = []
        if parts[4] != b"-":
            for item in parts[4].split(b","):
                first, sep, end = item.partition(b"-")
                if not sep or not first.isdigit() or not end.isdigit():
                    raise ValueError(f"data map with malformed range {item!r}")
                a, b = int(first), int(end)
                if a >= b or (ranges and a <= ranges[-1][1]):
                    raise ValueError("data map ranges not sorted and apart")
                ranges.append((a, b))
        return cls(block, lower_size, valid, tuple(ranges))

    def has(self, block: int) -> bool:
        i = bisect.bisect_right(self.ranges, (block, 1 << 62)) - 1
        return i >= 0 and self.ranges[i][0] <= block < self.ranges[i][1]

    def add(self, first: int, end: int) -> DataMap:
        """With blocks ``first`` to ``end`` (exclusive) in the upper copy."""
        merged: list[tuple[int, int]] = []
        for a, b in self.ranges:
            if b < first or a > end:
                merged.append((a, b))
            else:
                first, end = min(a, first), max(b, end)
        merged.append((first, end))
        merged.sort()
        return replace(self, ranges=tuple(merged))

    def truncated(self, size: int) -> DataMap:
        """After a truncation to ``size``: bytes past it never read from the lower again."""
        blocks = -(-size // self.block)
        ranges = tuple((a, min(b, blocks)) for a, b in self.ranges if a < blocks)
        return replace(self, valid=min(self.valid, size), ranges=ranges)

    def common(self, other: DataMap) -> DataMap:
        """With only the blocks both maps hold (and this map's ``valid``)."""
        found: list[tuple[int, int]] = []
        i = j = 0
        while i < len(self.ranges) and j < len(other.ranges):
            (a, b), (c, d) = self.ranges[i], other.ranges[j]
            if max(a, c) < min(b, d):
                found.append((max(a, c), min(b, d)))
            if b < d:
                i += 1
            else:
                j += 1
        return replace(self, ranges=tuple(found))

    def segments(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(from, to, in_upper)`` covering bytes ``start`` to ``end``, in order."""
        pos = start
        bs = self.block
        i = bisect.bisect_right(self.ranges, (pos // bs, 1 << 62)) - 1
        i = max(i, 0)
        while pos < end:
            while i < len(self.ranges) and self.ranges[i][1] * bs <= pos:
                i += 1
            if i < len(self.ranges) and self.ranges[i][0] * bs <= pos:
                stop = min(end, self.ranges[i][1] * bs)
                yield pos, stop, True
            else:
                nxt = self.ranges[i][0] * bs if i < len(self.ranges) else end
                stop = min(end, nxt)
                yield pos, stop, False
            pos = stop

    def missing(self) -> Iterator[tuple[int, int]]:
        """Byte ranges below ``valid`` that still read from the lower file."""
        for a, b, upper in self.segments(0, self.valid):
            if not upper:
                yield a, b

    @property
    def lower_bytes(self) -> int:
        """How many bytes still read from the lower file."""
        return sum(b - a for a, b in self.missing())

    @property
    def complete(self) -> bool:
        """Whether the lower file provides nothing any more."""
        return self.lower_bytes == 0


def read_map(fd: int) -> DataMap | None:
    """The data map of an upper file (None: not a partial file); ValueError if malformed."""
    value = realfs.getxattr(fd, schema.XATTR_DATAMAP)
    return None if value is None else DataMap.decode(value)


def blocks_of(upper: os.stat_result, lower_blocks: int, dmap: DataMap) -> int:
    """``st_blocks`` of a partial file: the upper copy's, and the lower file's share of what it
    still provides."""
    if dmap.lower_size <= 0:
        return upper.st_blocks
    return upper.st_blocks + lower_blocks * dmap.lower_bytes // dmap.lower_size


class PartialFile:
    """The data of one partial file while it is open: reads, writes, truncation, persistence.

    Shared by every open of the file (its inode's record holds it, and is its one user in the
    daemon: :class:`cowfs.daemon.upperdata.PartialData`). Writes, truncations and ``persist``
    are serialised by a lock; reads take the map as it is (it is replaced whole, only after the
    blocks it adds hold their data), so a read never sees a block before its copy-in is done.
    After :meth:`complete` the file is an ordinary one and every call goes to the upper copy.
    """

    def __init__(self, upper_fd: int, data_fd: int, dmap: DataMap, *,
                 read_only: bool = False) -> None:
        self._path_fd = os.dup(upper_fd)  # the upper copy (O_PATH), for its xattrs
        self._rw: int | None = None
        try:
            self._ro = realfs.reopen(upper_fd, os.O_RDONLY)
            try:
                # Reading the lower file must not change it (its access time included).
                self._lower = realfs.reopen_noatime(data_fd, os.O_RDONLY)
            except BaseException:
                os.close(self._ro)
                raise
        except BaseException:
            os.close(self._path_fd)
            raise
        size = os.fstat(self._ro).st_size
        # A crash between a truncation and its map leaves the map past the size: clamp it.
        self.map = dmap.truncated(size) if size < dmap.valid else dmap
        self._saved = dmap
        self.done = False
        #: A partial file of a lower layer: only ever read (it is copied up to be changed).
        self.read_only = read_only
        #: Called (with the file's lock held) once the file is complete.
        self.on_complete: Callable[[], None] | None = None
        self._lock = threading.Lock()

    # --- reading --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if self.done:
            return os.pread(self._ro, size, offset)
        dmap = self.map
        end = min(offset + size, os.fstat(self._ro).st_size)
        if end <= offset:
            return b""
        out = bytearray()
        for a, b, in_upper in dmap.segments(offset, end):
            if in_upper:
                out += _pread_full(self._ro, a, b - a)
            else:
                lower_end = min(b, dmap.valid)
                if a < lower_end:
                    out += _pread_full(self._lower, a, lower_end - a)
                out += bytes(b - max(a, lower_end))
        return bytes(out)

    def seek(self, offset: int, whence: int) -> int:
        """``SEEK_DATA``/``SEEK_HOLE``: the whole file is data (holes are not tracked across
        the two copies), which POSIX allows."""
        if self.done:
            return os.lseek(self._ro, offset, whence)
        size = os.fstat(self._ro).st_size
        if offset < 0 or offset >= size:
            raise OSError(errno.ENXIO, "offset past the end of the file")
        return offset if whence == os.SEEK_DATA else size

    # --- writing --------------------------------------------------------------------------

    def _writable(self) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "a partial file of a lower layer is never changed")
        if self._rw is None:
            self._rw = realfs.reopen(self._path_fd, os.O_RDWR)
        return self._rw

    def write(self, offset: int, data: bytes) -> int:
        with self._lock:
            rw = self._writable()
            if self.done or not data:
                return os.pwrite(rw, data, offset)
            bs = self.map.block
            first, last = offset // bs, (offset + len(data) - 1) // bs
            size = os.fstat(rw).st_size
            if offset + len(data) > size:
                self._before_growing()
            ready = set()  # blocks that hold the file's content before the write
            for block in {first, last}:
                whole = offset <= block * bs and offset + len(data) >= (block + 1) * bs
                if self.map.has(block):
                    ready.add(block)
                elif not whole:
                    self._copy_in(rw, block, size)
                    ready.add(block)
            n = os.pwrite(rw, data, offset)
            end = (offset + n) // bs
            if (offset + n) % bs and end in ready:
                end += 1
            elif n < len(data):
                # A short write (a full disk) that stopped inside a block it was to cover whole:
                # that block's rest is not the file's content, so the write ends before it.
                n = max(end * bs - offset, 0)
                if n == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if end > first:
                self.map = self.map.add(first, end)
            if len(self.map.encode()) > MAX_MAP_BYTES:
                log.debug("partial file fd=%d: map full, completing it", self._path_fd)
                try:
                    self._complete(rw)
                except OSError as e:  # the write is done: persist() tries again, and reports
                    log.warning("partial file fd=%d: cannot complete it: %s", self._path_fd,
                                e.strerror)
            return n

    def _copy_in(self, rw: int, block: int, size: int) -> None:
        """Give the upper copy block ``block``'s current content (from the lower file, zeros
        past what it provides), before a write that covers only part of it."""
        bs = self.map.block
        start, end = block * bs, min((block + 1) * bs, size)
        lower_end = min(end, self.map.valid)
        if start < lower_end:
            realfs.copy_range(self._lower, rw, start, lower_end)
        zero_from = max(start, lower_end)
        if zero_from < end:
            # Whatever a crash left there (written, never recorded) must read as zeros now.
            realfs.zero_range(rw, zero_from, end - zero_from)

    def truncate(self, size: int) -> None:
        """The truncation itself is the change; recording the map after it is not needed to read
        the file right (a stored ``valid`` past the size is read as the size), only before the
        file grows again (:meth:`_before_growing`), so a failure to record it is only logged."""
        with self._lock:
            rw = self._writable()
            if not self.done and size > os.fstat(rw).st_size:
                self._before_growing()
            realfs.ftruncate(rw, size)
            if self.done:
                return
            self.map = self.map.truncated(size)
            try:
                if self.map.complete:  # truncated to 0, or below every block not up yet
                    self._complete(rw)
                else:
                    self._record(rw)
            except OSError as e:
                log.warning("partial file fd=%d: cannot record its map after a truncation (done "
                            "at the next close): %s", self._path_fd, e.strerror)

    def _before_growing(self) -> None:
        """Before the file grows: a stored map that still shows lower bytes past the size (a
        truncation not recorded yet) would show them in the new range after a crash."""
        if self._saved.valid > self.map.valid:
            self._record(self._writable())

    def allocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2): plain allocation changes no byte, so the map stays; every other mode
        (punching, zeroing, collapsing, inserting ranges) runs on the completed file."""
        with self._lock:
            rw = self._writable()
            if not self.done and mode & ~_FALLOC_KEEP_SIZE:
                self._complete(rw)
            realfs.fallocate(rw, mode, offset, length)

    # --- persistence ----------------------------------------------------------------------

    @property
    def dirty(self) -> bool:
        return not self.done and not self.read_only and self.map != self._saved

    def persist(self) -> bool:
        """Make the map on disk what it is here (data first), or complete the file if nothing is
        left in the lower file. True if that changed the file's metadata."""
        with self._lock:
            if self.done or self.read_only:
                return False
            rw = self._writable()
            changed = self.map != self._saved
            if len(self.map.encode()) > MAX_MAP_BYTES:  # its completion failed in write()
                try:
                    self._complete(rw)
                except OSError:
                    self.map = self.map.common(self._saved)
                    raise
                return True
            if changed:
                try:
                    self._record(rw)
                except OSError:
                    # The blocks it could not record are not the file's: the close (or fsync)
                    # that reports the error loses those writes, and reads show it at once.
                    self.map = self.map.common(self._saved)
                    raise
            if self.map.complete:
                # Recorded first: completing it is then only tidying up, tried again later.
                try:
                    self._complete(rw)
                except OSError as e:
                    log.warning("partial file fd=%d: cannot complete it yet: %s", self._path_fd,
                                e.strerror)
                    return changed
                return True
            return changed

    def _record(self, rw: int) -> None:
        """Store the map: its blocks' data on disk first."""
        realfs.fdatasync(rw)
        realfs.setxattr(self._path_fd, schema.XATTR_DATAMAP, self.map.encode())
        self._saved = self.map

    def fsync(self, datasync: bool) -> None:
        changed = self.persist()
        rw = self._writable()
        if datasync and not changed:
            os.fdatasync(rw)
        else:
            os.fsync(rw)  # the map (or its removal) is metadata: fsync writes it

    def complete(self) -> None:
        """Copy in everything the lower file still provides and make it an ordinary file."""
        with self._lock:
            if not self.done:
                self._complete(self._writable())

    def _complete(self, rw: int) -> None:
        """Copying in is not a change users can see: the times, the mode (set-ID bits) and
        ``security.capability`` (which writes drop) are as before it."""
        st = os.fstat(rw)
        caps = realfs.getxattr(self._path_fd, CAPABILITY)
        fill_missing(rw, self._lower, self.map, st.st_size)
        restore_after_fill(self._path_fd, st, caps)
        realfs.fdatasync(rw)
        realfs.removexattr(self._path_fd, schema.XATTR_METACOPY)  # the commit point
        with contextlib.suppress(OSError):
            realfs.removexattr(self._path_fd, schema.XATTR_DATAMAP)
        self.done = True
        if self.on_complete is not None:
            self.on_complete()
        log.debug("partial file fd=%d completed", self._path_fd)

    def close(self) -> None:
        for fd in (self._ro, self._rw, self._lower, self._path_fd):
            if fd is not None:
                os.close(fd)


def fill_missing(dst: int, data: int, dmap: DataMap, size: int) -> None:
    """Write into ``dst`` (open for writing) every range of the first ``size`` bytes that
    ``dmap`` does not hold: from ``data`` (the data file, open for reading) below ``valid``,
    zeros past it. ``dst`` then holds the full content of a partial file with that map."""
    for a, b, in_upper in dmap.segments(0, size):
        if in_upper:
            continue
        lower_end = min(b, dmap.valid)
        if a < lower_end:
            realfs.copy_range(data, dst, a, lower_end)
        if max(a, lower_end) < b:
            realfs.zero_range(dst, max(a, lower_end), b - max(a, lower_end))


def restore_after_fill(fd: int, before: os.stat_result, caps: bytes | None, *,
                       chmod: bool = False, mtime_ns: int | None = None) -> None:
    """After data was written into a marked file in place to give it its own (no change users
    can see): its ``security.capability`` (``caps``, which a write drops), its mode (set-ID
    bits; ``chmod``: it was changed on purpose) and its times as in ``before`` (``mtime_ns``:
    instead of ``before``'s, as :func:`cowfs.copyup.copy_attributes`)."""
    if caps is not None and realfs.getxattr(fd, CAPABILITY) != caps:
        realfs.setxattr(fd, CAPABILITY, caps)
    mode = stat.S_IMODE(before.st_mode)
    if chmod or stat.S_IMODE(os.fstat(fd).st_mode) != mode:
        realfs.chmod(fd, mode)
    realfs.utimens(fd, before.st_atime_ns, before.st_mtime_ns if mtime_ns is None else mtime_ns)


_FALLOC_KEEP_SIZE = 0x01
#: Dropped by a write (the kernel's ``file_remove_privs``): kept when a file is given its data.
CAPABILITY = "security.capability"


class _Content(io.RawIOBase):
    """A partial file's content as a stream, for the offline tools."""

    def __init__(self, opened: PartialFile) -> None:
        super().__init__()
        self._file = opened
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._file.read(self._pos, len(buffer))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def open_content(upper_fd: int, data_fd: int, dmap: DataMap) -> BinaryIO:
    """A partial file's full content (its blocks here, the rest from ``data_fd``), read-only:
    what ``diff``, ``export`` and ``commit`` read (both descriptors may be ``O_PATH``)."""
    return io.BufferedReader(_Content(PartialFile(upper_fd, data_fd, dmap)),
                             1 << 20)


def _pread_full(fd: int, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` (zeros for whatever the file is short of)."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            return data + bytes(size - len(data))
        data += more
    return data
