"""Merged directory listings (the kernel's fs/overlayfs/readdir.c).

A listing is the union of the names in every layer of a directory, upper first, without duplicates.
Whether a name is really visible (and not whited out, or hidden below a non-directory) is decided
per entry by the same resolution as a lookup, since readdirplus must look every entry up anyway.

The listing is taken once per open directory (and again on rewind), and offsets index into that
snapshot, so they stay valid while the directory changes: ``rm -rf`` of a large merged directory,
and ``telldir``/``seekdir``, see every entry exactly once.

An entry whose lookup fails (a refused redirect) is still listed, without attributes, as the
kernel lists it; only using it fails. One bad entry never makes its directory unlistable.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Container, Iterable

from . import realfs, schema
from .inodes import Inode


def merge_names(listings: Iterable[Iterable[str]], hidden: Container[str] = ()) -> list[str]:
    """The union of the layers' names, topmost layer's order first, each name once."""
    seen: dict[str, None] = {}
    for names in listings:
        for name in names:
            if name not in hidden:
                seen.setdefault(name, None)
    return list(seen)


def candidate_names(directory: Inode, hidden: Container[str]) -> list[str]:
    """Every name that may be visible in ``directory`` (whiteouts are filtered by the caller)."""
    # Listing a lower directory leaves its access time alone (the kernel's overlayfs mounts its
    # lowers noatime).
    return merge_names((realfs.list_names(real.fd, noatime=not real.layer.is_upper)
                        for real in directory.reals), hidden)


def entry_type(directory: Inode, name: str) -> tuple[int, int, int]:
    """The file type (``S_IFMT`` bits), layer index and inode number of the topmost real object
    named ``name`` (zeros if none): what a listing shows for an entry whose lookup fails (the
    kernel shows the real entry's type)."""
    for real in directory.reals:
        try:
            st = os.stat(name, dir_fd=real.fd, follow_symlinks=False)
        except OSError:
            continue
        return stat.S_IFMT(st.st_mode), real.layer.index, st.st_ino
    return 0, 0, 0


class _NeedsLookup:
    def __repr__(self) -> str:
        return "NEEDS_LOOKUP"


#: :func:`plain_entry` cannot tell the entry without a full lookup.
NEEDS_LOOKUP = _NeedsLookup()


def plain_entry(directory: Inode, name: str) -> tuple[int, int, int] | _NeedsLookup | None:
    """The file type, layer index and inode number of ``name`` for a listing without attributes
    (a plain ``readdir``), from one ``fstatat`` per layer instead of a lookup; None when the
    name is whited out (or gone).

    :data:`NEEDS_LOOKUP` where only a lookup can say: an upper object (its number may come from
    its origin), a marked regular file of a lower layer that is a cowfs upper (a metacopy file
    there is numbered by its data file), an empty file in a directory that may hold xattr whiteouts,
    anything unusual.
    """
    for real in directory.reals:
        try:
            st = os.stat(name, dir_fd=real.fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError:
            return NEEDS_LOOKUP
        if schema.is_device_whiteout(st.st_mode, st.st_rdev):
            return None
        if real.layer.is_upper or (
                real.mark is schema.DirMark.XWHITEOUTS
                and schema.may_be_xattr_whiteout(st.st_mode, st.st_size)) or (
                real.layer.reads_metacopy and stat.S_ISREG(st.st_mode) and st.st_size > 0
                and _may_be_marked(real.fd, name)):
            return NEEDS_LOOKUP
        return stat.S_IFMT(st.st_mode), real.layer.index, st.st_ino
    return None


def _may_be_marked(dirfd: int, name: str) -> bool:
    """Whether ``name`` in ``dirfd`` may carry the metacopy mark: one ``lgetxattr`` by the
    directory's magic link (which names the directory itself; the name is not followed), so
    that a listing of a cowfs upper stacked as a lower looks up only its marked files. Any
    failure but "no such attribute" leaves it to the lookup."""
    try:
        os.getxattr(f"{realfs.proc_path(dirfd)}/{name}", schema.XATTR_METACOPY,
                    follow_symlinks=False)
    except OSError as e:
        return e.errno != errno.ENODATA
    return True


class DirHandle:
    """An open directory: a snapshot of candidate names, taken at the first read."""

    __slots__ = ("inode", "names")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.names: list[str] | None = None

    def snapshot(self, offset: int, hidden: Container[str]) -> list[str]:
        """The names to serve offsets into; offset 0 (a new read or a rewind) takes a fresh one."""
        if offset == 0 or self.names is None:
            self.names = [".", "..", *candidate_names(self.inode, hidden)]
        return self.names


#: A ``readdir`` offset (the cookie the kernel passes back, ``d_off``) of a handle-less listing:
#: the snapshot's number in the high bits, the index of the next entry in the low ones.
_INDEX_BITS = 32
_INDEX_MASK = (1 << _INDEX_BITS) - 1
#: Snapshot numbers wrap below this, so that offsets stay positive 63-bit values.
_MAX_SNAPSHOT = 1 << 30


class Snapshots:
    """Listings for a kernel that opens directories by itself (no ``opendir`` requests, so no
    directory handles): each read at offset 0 takes a snapshot, and the offsets handed out name it,
    so that a reader continuing at an offset gets the snapshot it started from, as with a
    :class:`DirHandle`. Two readers of one directory never share one.

    Snapshots are kept least recently used first, within ``max_names`` names in all (about 10 MiB;
    the newest is kept whatever its size), so a walk of many directories holds few. A reader
    whose snapshot was dropped (after that many names of other listings) continues in a fresh
    one at the same index: changes made meanwhile may then show or hide entries near the offset.
    """

    def __init__(self, max_names: int = 1 << 17) -> None:
        self._snapshots: OrderedDict[int, tuple[int, list[str]]] = OrderedDict()
        self._names = 0
        self._max_names = max_names
        self._counter = 0

    def names(self, directory: Inode, offset: int,
              hidden: Container[str]) -> tuple[int, int, list[str]]:
        """``(snapshot number, index to start at, names)`` for a read of ``directory`` at
        ``offset``; the entry at index ``i`` gets the offset ``offset_of(number, i + 1)``."""
        number, index = offset >> _INDEX_BITS, offset & _INDEX_MASK
        if offset != 0:
            kept = self._snapshots.get(number)
            if kept is not None and kept[0] == directory.number:
                self._snapshots.move_to_end(number)
                return number, index, kept[1]
        names = [".", "..", *candidate_names(directory, hidden)]
        self._counter = self._counter % (_MAX_SNAPSHOT - 1) + 1
        number = self._counter
        self._snapshots[number] = (directory.number, names)
        self._names += len(names)
        while self._names > self._max_names and len(self._snapshots) > 1:
            _, (_, dropped) = self._snapshots.popitem(last=False)
            self._names -= len(dropped)
        return number, index, names

    def clear(self) -> None:
        self._snapshots.clear()
        self._names = 0


def offset_of(number: int, index: int) -> int:
    return (number << _INDEX_BITS) | index
