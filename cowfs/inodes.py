"""The inode table: overlay objects, their numbers and lookup counts (pyfuse3's inode lifecycle).

An :class:`Inode` is one object of the merged view. It holds ``O_PATH`` descriptors for its real
objects, topmost first: for a directory, the upper (if any) and every lower directory that merges
into it; for anything else, the upper copy (if any) and the lower object it came from.

Inode numbers are never reused within a mount: the kernel may still hold a number for an object that
was just unlinked. The number is also the ``st_ino`` the mount reports (pyfuse3 uses one for both),
which makes ``st_ino`` unique within the mount.

An inode is found again by the (st_dev, st_ino) of its topmost real object, so that hard links in
the upper are one inode. State is freed only in :meth:`InodeTable.forget`, when the kernel's lookup
count drops to zero.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterable

from .resolve import Real

ROOT_NUMBER = 1

Key = tuple[int, int]


def key_of(real: Real) -> Key:
    st = real.stat()
    return (st.st_dev, st.st_ino)


class Inode:
    """One object of the merged view."""

    __slots__ = ("alive", "copy_up_lock", "keys", "links", "lookups", "number", "reals")

    def __init__(self, number: int, reals: tuple[Real, ...]) -> None:
        self.number = number
        #: Topmost first. Replaced as a whole (never mutated), so readers on other threads see
        #: either the old or the new stack.
        self.reals = reals
        #: Names this object is known by, as {(parent number, name): parent}; copy-up needs one.
        self.links: dict[tuple[int, str], Inode] = {}
        self.lookups = 0
        self.copy_up_lock = threading.Lock()
        self.keys: set[Key] = set()
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

    def add_link(self, parent: Inode, name: str) -> None:
        self.links[(parent.number, name)] = parent

    def drop_link(self, parent: Inode, name: str) -> None:
        self.links.pop((parent.number, name), None)

    def any_link(self) -> tuple[Inode, str] | None:
        """A live (parent, name) under which this object is visible, for copy-up."""
        for (_, name), parent in self.links.items():
            if parent.alive:
                return parent, name
        return None

    def release(self) -> None:
        self.alive = False
        for real in self.reals:
            os.close(real.fd)
        self.reals = ()
        self.links.clear()


class InodeTable:
    """All inodes the kernel knows about. Thread-safe: copy-ups run in worker threads."""

    def __init__(self, root_reals: tuple[Real, ...]) -> None:
        self._lock = threading.Lock()
        self._by_number: dict[int, Inode] = {}
        self._by_key: dict[Key, Inode] = {}
        self._next_number = ROOT_NUMBER + 1
        self.root = Inode(ROOT_NUMBER, root_reals)
        self.root.lookups = 1  # the kernel never forgets the root
        self._register(self.root, key_of(root_reals[0]))

    def __len__(self) -> int:
        return len(self._by_number)

    def _register(self, inode: Inode, key: Key) -> None:
        self._by_number[inode.number] = inode
        self._by_key[key] = inode
        inode.keys.add(key)

    def get(self, number: int) -> Inode:
        try:
            return self._by_number[number]
        except KeyError:
            raise OSError(errno.ESTALE, "unknown inode") from None

    def remember(self, reals: tuple[Real, ...], parent: Inode | None, name: str) -> Inode:
        """The inode for freshly resolved ``reals`` (taking ownership of their descriptors).

        Counts one kernel lookup. An object already known (same topmost real object) keeps its
        inode, and the new descriptors are closed.
        """
        key = key_of(reals[0])
        with self._lock:
            inode = self._by_key.get(key)
            if inode is None:
                inode = Inode(self._next_number, reals)
                self._next_number += 1
                self._register(inode, key)
            else:
                _close_all(reals)
            inode.lookups += 1
        if parent is not None:
            inode.add_link(parent, name)
        return inode

    def add_key(self, inode: Inode, real: Real) -> None:
        """Make ``inode`` findable by another real object (its new upper copy)."""
        with self._lock:
            self._register(inode, key_of(real))

    def drop_key(self, inode: Inode, real: Real) -> None:
        """Forget that ``real`` leads to ``inode`` (a lower object hidden by its copy-up)."""
        key = key_of(real)
        with self._lock:
            if self._by_key.get(key) is inode:
                del self._by_key[key]
            inode.keys.discard(key)

    def forget(self, number: int, count: int) -> None:
        with self._lock:
            inode = self._by_number.get(number)
            if inode is None or inode is self.root:
                return
            inode.lookups -= count
            if inode.lookups > 0:
                return
            del self._by_number[number]
            for key in inode.keys:
                if self._by_key.get(key) is inode:
                    del self._by_key[key]
        inode.release()


def _close_all(reals: Iterable[Real]) -> None:
    for real in reals:
        os.close(real.fd)
