"""Merged directory listings (the kernel's fs/overlayfs/readdir.c).

A listing is the union of the names in every layer of a directory, upper first, without duplicates
and without whited-out names (one ``fstatat`` per name, :func:`listed_entry`, which also keeps what
a listing without attributes shows of a lower name). The attributes of each entry come from the
same resolution as a lookup, since readdirplus must look every entry up anyway.

The listing is taken once per open directory (and again on rewind), and offsets index into that
snapshot, so they stay valid while the directory changes: ``rm -rf`` of a large merged directory,
and ``telldir``/``seekdir``, see every entry exactly once. Every offset up to the end names an
entry (whiteouts are left out of the snapshot, not skipped in it), so a ``seekdir`` to any offset
reads on from there, as on the kernel's overlayfs, also when the kernel serves the listing from its
cache, which goes on only from an offset it was given.

An entry whose lookup fails (a refused redirect) is still listed, without attributes, as the
kernel lists it; only using it fails. One bad entry never makes its directory unlistable.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable

from ..core import realfs, schema
from ..core.resolve import Real, merge_names
from .inodes import Inode


def candidate_names(directory: Inode, hidden: Container[str], *,
                    upper_noatime: bool = False) -> list[str]:
    """Every name that may be visible in ``directory`` (whiteouts are filtered by the caller)."""
    # Listing a lower directory leaves its access time alone (the kernel's overlayfs mounts its
    # lowers noatime); the upper's too with ``upper_noatime`` (a noatime or read-only mount).
    return merge_names((realfs.list_names(real.fd, noatime=upper_noatime
                                          or not real.layer.is_upper)
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


def layer_fds(directory: Inode) -> list[tuple[Real, int]]:
    """``directory``'s real directories and their descriptors, got once for a whole listing
    (valid until the request ends, :mod:`cowfs.refs`)."""
    return [(real, real.fd) for real in directory.reals]


def _top(directory: Inode, name: str, fds: list[tuple[Real, int]] | None = None
         ) -> tuple[Real, os.stat_result] | _NeedsLookup | None:
    """The topmost real object named ``name`` and its ``lstat``; None if no layer has one,
    :data:`NEEDS_LOOKUP` if a layer cannot say. ``fds``: :func:`layer_fds`, for a listing."""
    for real, fd in layer_fds(directory) if fds is None else fds:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError:
            return NEEDS_LOOKUP
        return real, st
    return None


def _may_hide(real: Real, st: os.stat_result) -> bool:
    """Whether only a lookup can tell if this real object is a whiteout (an xattr whiteout)."""
    return (real.mark is schema.DirMark.XWHITEOUTS
            and schema.may_be_xattr_whiteout(st.st_mode, st.st_size))


def _marked_below(real: Real, st: os.stat_result, name: str) -> bool:
    """A regular file of a lower layer that is a cowfs upper which may carry the metacopy mark:
    numbered by its data file, so only a lookup gives its ``d_ino`` (issue 20, item 10)."""
    return (real.layer.reads_metacopy and stat.S_ISREG(st.st_mode) and st.st_size > 0
            and _may_be_marked(real.fd, name))


def plain_entry(directory: Inode, name: str) -> tuple[int, int, int] | _NeedsLookup | None:
    """The file type, layer index and inode number of ``name`` for a listing without attributes
    (a plain ``readdir``), from one ``fstatat`` per layer instead of a lookup; None when the
    name is whited out (or gone).

    :data:`NEEDS_LOOKUP` where only a lookup can say: an upper object (its number may come from
    its origin), a marked regular file of a lower layer that is a cowfs upper (a metacopy file
    there is numbered by its data file), an empty file in a directory that may hold xattr whiteouts,
    anything unusual.
    """
    found = _top(directory, name)
    if not isinstance(found, tuple):
        return found
    real, st = found
    if schema.is_device_whiteout(st.st_mode, st.st_rdev):
        return None
    if real.layer.is_upper or _may_hide(real, st) or _marked_below(real, st, name):
        return NEEDS_LOOKUP
    return stat.S_IFMT(st.st_mode), real.layer.index, st.st_ino


def listed_entry(directory: Inode, name: str, fds: list[tuple[Real, int]] | None = None
                 ) -> tuple[bool | _NeedsLookup, tuple[int, int, int] | None]:
    """Whether a listing shows ``name`` (it is not whited out, nor gone), from one ``fstatat``
    per layer, :data:`NEEDS_LOOKUP` where only a lookup can say; and, for a name a lower layer
    answers, what :func:`plain_entry` would (else None)."""
    found = _top(directory, name, fds)
    if not isinstance(found, tuple):
        return (False if found is None else found), None
    real, st = found
    if schema.is_device_whiteout(st.st_mode, st.st_rdev):
        return False, None
    if _may_hide(real, st):
        return NEEDS_LOOKUP, None
    if real.layer.is_upper or _marked_below(real, st, name):
        return True, None  # shown; numbered by a lookup (a metacopy file by its data file)
    return True, (stat.S_IFMT(st.st_mode), real.layer.index, st.st_ino)


class Listing(list[str]):
    """The names a snapshot serves: ``"."``, ``".."`` and every name the directory shows; and,
    for the names a lower layer answers, the file type, layer index and inode number a listing
    without attributes shows (:func:`plain_entry`), found by the same ``fstatat``."""

    __slots__ = ("plain",)

    def __init__(self, names: Iterable[str], plain: dict[str, tuple[int, int, int]]) -> None:
        super().__init__(names)
        self.plain = plain


#: Lists a directory for a snapshot (``Overlay.listing``).
Lister = Callable[[Inode], Listing]


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
    """An open directory: a snapshot of its listing, taken at the first read."""

    __slots__ = ("inode", "names")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.names: Listing | None = None

    def snapshot(self, offset: int, listing: Lister) -> Listing:
        """The names to serve offsets into; offset 0 (a new read or a rewind) takes a fresh one."""
        if offset == 0 or self.names is None:
            self.names = listing(self.inode)
        return self.names


class _Snapshot:
    __slots__ = ("directory", "names", "reached")

    def __init__(self, directory: int, names: Listing) -> None:
        self.directory = directory
        self.names = names
        self.reached = 0  # the offset after the last entry served from it


class Snapshots:
    """Listings for a kernel that opens directories by itself (no ``opendir`` requests, so no
    directory handles, and nothing in a request to tell two readers of one directory apart):
    each read at offset 0 takes a snapshot, and a read that goes on at an offset goes on in the
    most recent snapshot of that directory whose last reply ended there (the reader's own, also
    while another reader starts over), else in the most recent one of that directory.

    Offsets are plain indexes into a snapshot, with no gaps: the kernel's listing cache goes on
    only from an offset it handed out (``fuse_parse_cache``), so a ``seekdir`` to any other
    offset would read the end of the directory; with every offset up to the end naming an entry,
    a seek anywhere reads on from that entry, as on the kernel's overlayfs (whose offsets are
    indexes into its merged listing too). (One exception: a directory of the bottom layer alone
    is listed without an ``fstatat`` per name, ``Overlay.listing``, so a whiteout left in it is
    a gap, skipped when served; the kernel's overlayfs lists such a name.)

    Snapshots are kept least recently used first, within ``max_names`` names in all (about 10 MiB;
    the newest is kept whatever its size), so a walk of many directories holds few. A reader
    whose snapshot was dropped, or taken over by another reader that started over at the same
    offset, continues in a fresh one at the same index: changes made meanwhile may then show or
    hide entries near the offset.
    """

    def __init__(self, max_names: int = 1 << 17) -> None:
        self._snapshots: OrderedDict[int, _Snapshot] = OrderedDict()
        self._by_dir: dict[int, list[int]] = {}
        self._names = 0
        self._max_names = max_names
        self._counter = 0

    def names(self, directory: Inode, offset: int, listing: Lister) -> tuple[int, Listing]:
        """``(snapshot key, names)`` for a read of ``directory`` at ``offset``; the entry at
        index ``i`` gets the offset ``i + 1``. Tell :meth:`reached` where the reply ended."""
        if offset != 0:
            keys = self._by_dir.get(directory.number, [])
            key = next((k for k in reversed(keys) if self._snapshots[k].reached == offset),
                       keys[-1] if keys else None)
            if key is not None:
                self._snapshots.move_to_end(key)
                return key, self._snapshots[key].names
        names = listing(directory)
        self._counter += 1
        self._snapshots[self._counter] = _Snapshot(directory.number, names)
        self._by_dir.setdefault(directory.number, []).append(self._counter)
        self._names += len(names)
        while self._names > self._max_names and len(self._snapshots) > 1:
            key, dropped = self._snapshots.popitem(last=False)
            self._forget(key, dropped)
        return self._counter, names

    def reached(self, key: int, offset: int) -> None:
        """A reply from snapshot ``key`` ended before the entry at ``offset``."""
        kept = self._snapshots.get(key)
        if kept is not None:
            kept.reached = offset

    def _forget(self, key: int, dropped: _Snapshot) -> None:
        self._names -= len(dropped.names)
        keys = self._by_dir[dropped.directory]
        keys.remove(key)
        if not keys:
            del self._by_dir[dropped.directory]

    def clear(self) -> None:
        self._snapshots.clear()
        self._by_dir.clear()
        self._names = 0
