"""The inode table: overlay objects, their numbers and lookup counts (pyfuse3's inode lifecycle).

An :class:`Inode` is one object of the merged view. It holds ``O_PATH`` descriptors for its real
objects, topmost first: for a directory, the upper (if any) and every lower directory that merges
into it; for anything else, the upper copy (if any) and the lower object it came from.

Inode numbers are stable: an object's number is derived from the real inode it *originates* from
(a lower object, or, for an upper object, the lower object recorded in its ``user.cowfs.origin``
at copy-up, else the upper object itself), so ``st_ino`` is the same before and after copy-up and
across mounts. pyfuse3 uses the number both as the FUSE node id and as ``st_ino``. With all layers
on one filesystem the number is that filesystem's inode number; otherwise the high byte says which
filesystem (like the kernel's ``xino``), so numbers stay unique across filesystems.

A number is never given to two live objects: the table holds a descriptor of every real object it
knows, so the filesystem cannot reuse that inode while the kernel may still ask for it. State is
freed only in :meth:`InodeTable.forget`, when the kernel's lookup count drops to zero.

Known limits: an inode number above 2**56 on a layer whose filesystem is not the only one is folded
into 56 bits, which could in principle collide. An origin xattr copied onto another upper object
behind cowfs's back would give two objects one number: the layers must only be changed by cowfs.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable

from . import realfs, schema
from .layers import Layer
from .resolve import Real

ROOT_NUMBER = 1
_FS_SHIFT = 56
_INO_MASK = (1 << _FS_SHIFT) - 1


class InodeNumbers:
    """Stable inode numbers for the objects of one layer stack."""

    def __init__(self, layers: tuple[Layer, ...]) -> None:
        devices: dict[int, int] = {}
        for layer in layers:
            devices.setdefault(layer.dev, len(devices))
        self._fs_of_layer = {layer.index: devices[layer.dev] for layer in layers}
        self._single_fs = len(devices) == 1

    def number(self, layer_index: int, ino: int) -> int:
        if self._single_fs and ino > ROOT_NUMBER:
            return ino
        folded = ino if ino <= _INO_MASK else hash(ino) & _INO_MASK
        return ((self._fs_of_layer[layer_index] + 1) << _FS_SHIFT) | folded

    def origin_of(self, real: Real) -> tuple[int, int]:
        """``(layer index, inode)`` of the real inode an object originates from."""
        if real.layer.is_upper:
            value = realfs.getxattr(real.fd, schema.origin_xattr(real.mode))
            origin = schema.parse_origin(value) if value is not None else None
            if origin is not None and origin[0] in self._fs_of_layer and origin[0] != 0:
                return origin
        return real.layer.index, real.ino or os.fstat(real.fd).st_ino

    def of(self, real: Real) -> int:
        return self.number(*self.origin_of(real))


class Inode:
    """One object of the merged view.

    Shared between the trio thread and worker threads: ``reals`` and ``links`` change only under
    the inode's short state lock (never held across a system call), and ``reals`` is replaced as a
    whole, so readers that take no lock see either the old or the new stack.
    """

    __slots__ = ("_links", "_state", "alive", "copy_up_lock", "lookups", "number", "reals")

    def __init__(self, number: int, reals: tuple[Real, ...]) -> None:
        self.number = number
        #: Topmost first. Replaced as a whole (never mutated): see :meth:`replace_top`.
        self.reals = reals
        #: Names this object is known by, as {(parent number, name): parent}; copy-up needs one.
        self._links: dict[tuple[int, str], Inode] = {}
        self.lookups = 0
        #: Held for the whole of a copy-up (which may take long): a second opener waits for it.
        self.copy_up_lock = threading.Lock()
        #: Held only while ``reals`` or ``links`` is read-modify-written.
        self._state = threading.Lock()
        self.alive = True

    def __repr__(self) -> str:
        return f"<Inode {self.number} {[r.layer.index for r in self.reals]}>"

    @property
    def top(self) -> Real:
        return self.reals[0]

    @property
    def upper(self) -> Real | None:
        top = self.reals[0]
        return top if top.layer.is_upper else None

    @property
    def lowers(self) -> tuple[Real, ...]:
        return tuple(r for r in self.reals if not r.layer.is_upper)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.reals[0].mode)

    @property
    def is_merged_dir(self) -> bool:
        """A directory made of several layers (the kernel reports st_nlink=1 for these)."""
        return self.is_dir and len(self.reals) > 1

    @property
    def child_parents(self) -> tuple[Real, ...]:
        """The real directories a child name is looked up in (all of them, for a directory)."""
        return self.reals

    def push_upper(self, upper: Real) -> None:
        """The object got an upper copy: it goes on top of the stack."""
        with self._state:
            self.reals = (upper, *self.reals)

    def replace_top(self, top: Real) -> None:
        """The topmost real object changed (a mark or a redirect was added to it)."""
        with self._state:
            self.reals = (top, *self.reals[1:])

    def replace_reals(self, reals: tuple[Real, ...]) -> None:
        with self._state:
            self.reals = reals

    def add_link(self, parent: Inode, name: str) -> None:
        """Remember a name, as the most recently used one (dicts keep insertion order)."""
        with self._state:
            self._links.pop((parent.number, name), None)
            self._links[(parent.number, name)] = parent

    def drop_link(self, parent: Inode, name: str) -> None:
        with self._state:
            self._links.pop((parent.number, name), None)

    def move_link(self, old_parent: Inode, old_name: str, new_parent: Inode,
                  new_name: str) -> None:
        with self._state:
            self._links.pop((old_parent.number, old_name), None)
            self._links.pop((new_parent.number, new_name), None)
            self._links[(new_parent.number, new_name)] = new_parent

    def any_link(self) -> tuple[Inode, str] | None:
        """A live (parent, name) under which this object is visible, for copy-up: the most
        recently looked up, which is the likeliest to be the one being opened."""
        with self._state:
            links = list(self._links.items())
        for (_, name), parent in reversed(links):
            if parent.alive:
                return parent, name
        return None

    def release(self) -> None:
        self.alive = False
        with self._state:
            reals, self.reals = self.reals, ()
            self._links.clear()
        for real in reals:
            os.close(real.fd)


class InodeTable:
    """All inodes the kernel knows about. Thread-safe: copy-ups run in worker threads."""

    def __init__(self, root_reals: tuple[Real, ...], numbers: InodeNumbers) -> None:
        self._lock = threading.Lock()
        self.numbers = numbers
        self.root = Inode(ROOT_NUMBER, root_reals)
        self.root.lookups = 1  # the kernel never forgets the root
        self._by_number: dict[int, Inode] = {ROOT_NUMBER: self.root}
        #: Every other inode, least recently looked up first: what to ask the kernel to drop.
        self._recent: OrderedDict[int, Inode] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_number)

    def release_all(self) -> None:
        """Drop every inode, the root included (the mount is gone: nobody can ask any more)."""
        with self._lock:
            inodes = list(self._by_number.values())
            self._by_number.clear()
            self._recent.clear()
        for inode in inodes:
            inode.release()

    def get(self, number: int) -> Inode:
        try:
            return self._by_number[number]
        except KeyError:
            raise OSError(errno.ESTALE, "unknown inode") from None

    def remember(self, reals: tuple[Real, ...], parent: Inode | None, name: str) -> Inode:
        """The inode for freshly resolved ``reals`` (taking ownership of their descriptors).

        Counts one kernel lookup. An object already known keeps its inode (the new descriptors are
        closed): the same number means the same object.
        """
        number = self.numbers.of(reals[0])
        with self._lock:
            inode = self._by_number.get(number)
            if inode is None:
                inode = Inode(number, reals)
                self._by_number[number] = inode
            else:
                _close_all(reals)
            inode.lookups += 1
            self._recent[number] = inode
            self._recent.move_to_end(number)
        if parent is not None:
            inode.add_link(parent, name)
        return inode

    def forget(self, number: int, count: int) -> None:
        with self._lock:
            inode = self._by_number.get(number)
            if inode is None or inode is self.root:
                return
            inode.lookups -= count
            if inode.lookups > 0:
                return
            del self._by_number[number]
            self._recent.pop(number, None)
        inode.release()

    def least_recent(self, count: int) -> list[tuple[Inode, str]]:
        """The (parent, name) of the ``count`` least recently looked-up inodes, for the kernel to
        drop: each inode holds descriptors until the kernel forgets it."""
        with self._lock:
            oldest = list(itertools.islice(self._recent.values(), count))
        found = []
        for inode in oldest:
            link = inode.any_link()
            if link is not None:
                found.append(link)
        return found


def _close_all(reals: Iterable[Real]) -> None:
    for real in reals:
        os.close(real.fd)
