"""The inode table: overlay objects, their numbers and lookup counts (pyfuse3's inode lifecycle).

An :class:`Inode` is one object of the merged view. It knows its real objects, topmost first: for
a directory, the upper (if any) and every lower directory that merges into it; for anything else,
the upper copy (if any) and the lower object it came from. It holds no descriptor for them: each
is a name reference (:mod:`cowfs.core.refs`), whose descriptor is opened when a request needs it and
kept in a bounded cache, so an inode costs memory only and the kernel keeps as many as it likes.

Inode numbers are stable: an object's number is derived from the real inode it *originates* from
(a lower object, or, for an upper object, the lower object recorded in its ``user.cowfs.origin``
at copy-up, else the upper object itself), so ``st_ino`` is the same before and after copy-up and
across mounts. pyfuse3 uses the number both as the FUSE node id and as ``st_ino``. With all layers
on one filesystem the number is that filesystem's inode number; otherwise the high byte says which
filesystem (like the kernel's ``xino``), so numbers stay unique across filesystems.

A number is never given to two live objects: lower objects never go while mounted, and before
cowfs removes a name of an upper object an inode still reaches by that name, it pins the object's
descriptor (:meth:`cowfs.core.refs.Descriptors.leaving`), so the filesystem cannot reuse that inode
while the kernel may still ask for it. State is
freed only in :meth:`InodeTable.forget`, when the kernel's lookup count drops to zero.

An origin is untrusted input: lookup uses it only once verified (:mod:`cowfs.daemon.namei`), and
even a verified one never makes two different real objects one inode (:func:`same_object`): the
second gets a number of its own.

Known limits: an inode number above 2**56 on a layer whose filesystem is not the only one is folded
into 56 bits, which could in principle collide. Numbers given to the losers of such a collision
(forged origins that passed verification) are stable only within one mount.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import stat
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..core import origins
from ..core.layers import Layer
from ..core.refs import Descriptors
from ..core.resolve import Real

if TYPE_CHECKING:
    from .upperdata import PartialData

log = logging.getLogger(__name__)

ROOT_NUMBER = 1
_FS_SHIFT = 56
_INO_MASK = (1 << _FS_SHIFT) - 1
#: Where numbers for colliding objects start: the high byte no filesystem index reaches.
_SPARE_BASE = 0xFF << _FS_SHIFT


class InodeNumbers:
    """Stable inode numbers for the objects of one layer stack: the arithmetic alone (which real
    inode an object originates from is lookup's to say, :mod:`cowfs.daemon.namei`)."""

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

    def own(self, real: Real) -> int:
        """The number of a real object itself, whatever its origin says."""
        return self.number(real.layer.index, origins.ino_of(real))


def _identity(real: Real) -> tuple[int, int]:
    return real.layer.dev, origins.ino_of(real)


def same_object(known: tuple[Real, ...], found: tuple[Real, ...]) -> bool:
    """Whether a lookup's ``found`` reals are the object ``known`` (with the same number) is.

    The same topmost real object is. So is an upper copy whose origin was verified
    (:mod:`cowfs.core.origins`) when ``known`` was not copied up yet (a lookup that saw the copy-up
    before the inode did), and a lower object among ``known``'s lower ones (a lookup that
    resolved before the copy-up). Two different upper objects never are, whatever their origins
    say: the second gets a number of its own (:meth:`InodeTable.remember`).
    """
    if not known or not found or _identity(known[0]) == _identity(found[0]):
        return True
    if not known[0].layer.is_upper:
        return found[0].layer.is_upper
    if not found[0].layer.is_upper:
        return _identity(found[0]) in {_identity(r) for r in known[1:]}
    return False


#: The inodes' state locks, shared by number (a lock per inode cost 48 bytes of each; none is
#: held across a system call or while another is taken, so sharing one costs no more waiting).
_STATE_LOCKS = tuple(threading.Lock() for _ in range(64))


class Inode:
    """One object of the merged view.

    Shared between the trio thread and worker threads: ``reals`` and ``links`` change only under
    the inode's short state lock (never held across a system call), and ``reals`` is replaced as a
    whole, so readers that take no lock see either the old or the new stack.

    An inode the kernel holds costs memory only, a few hundred bytes: slots, no lock of its own
    (:data:`_STATE_LOCKS`), its names as one flat tuple.
    """

    __slots__ = ("_cache", "_copy_up_lock", "_links", "_xattr_changes", "absent_on", "alive",
                 "lookups", "number", "partial_data", "reals")

    def __init__(self, number: int, reals: tuple[Real, ...], cache: Descriptors) -> None:
        self.number = number
        self._cache = cache
        #: Topmost first, reached by reference (:func:`adopt`). Replaced as a whole (never
        #: mutated): see :meth:`replace_top`.
        self.reals = ((adopt(reals[0], cache),) if len(reals) == 1  # most: no generator
                      else tuple(adopt(real, cache) for real in reals))
        #: Names this object is known by, as parent, name, parent, name, ..., the most recently
        #: used last (one name for most objects: one flat tuple); copy-up needs one.
        self._links: tuple[Inode | str, ...] = ()
        self.lookups = 0
        #: See :attr:`copy_up_lock` (made when first needed: most inodes are never copied up).
        self._copy_up_lock: threading.Lock | None = None
        self.alive = True
        #: The real object found without the one xattr a frequent request asks of its kind:
        #: a regular file's ``security.capability`` (before every write, see
        #: :mod:`cowfs.daemon.xattrs`), a directory's default ACL (at every create in it, see
        #: ``Namespace._new_mode``).
        self.absent_on: Real | None = None
        #: Bumped by every change of an xattr through the mount: an absence read before a
        #: change is not remembered after it (:meth:`xattr_unless_absent`).
        self._xattr_changes = 0
        #: A partial file's state while the inode lives: its record, which only
        #: :mod:`cowfs.daemon.upperdata` makes and changes (under ``copy_up_lock``); let go at
        #: :meth:`release`.
        self.partial_data: PartialData | None = None

    @property
    def _state(self) -> threading.Lock:
        """Held only while ``reals`` or ``links`` is read-modify-written."""
        return _STATE_LOCKS[self.number & 63]

    @property
    def copy_up_lock(self) -> threading.Lock:
        """Held for the whole of a copy-up (which may take long): a second opener waits for it."""
        lock = self._copy_up_lock
        if lock is None:
            with self._state:
                if self._copy_up_lock is None:
                    self._copy_up_lock = threading.Lock()
                lock = self._copy_up_lock
        return lock

    def __repr__(self) -> str:
        return f"<Inode {self.number} {[r.layer.index for r in self.reals]}>"

    @property
    def top(self) -> Real:
        """The topmost real object; ESTALE once the inode was released (a request that took it
        before a forget released it)."""
        try:
            return self.reals[0]
        except IndexError:
            raise OSError(errno.ESTALE, f"inode {self.number} was forgotten") from None

    @property
    def upper(self) -> Real | None:
        top = self.top
        return top if top.layer.is_upper else None

    @property
    def lowers(self) -> tuple[Real, ...]:
        return tuple(r for r in self.reals if not r.layer.is_upper)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.top.mode)

    @property
    def is_merged_dir(self) -> bool:
        """A directory made of several layers (the kernel reports st_nlink=1 for these)."""
        return self.is_dir and len(self.reals) > 1

    @property
    def child_parents(self) -> tuple[Real, ...]:
        """The real directories a child name is looked up in (all of them, for a directory)."""
        return self.reals

    def push_upper(self, upper: Real) -> Real:
        """The object got an upper copy (whose descriptor it takes over): it goes on top of the
        stack. Returns it as the inode keeps it."""
        upper = adopt(upper, self._cache)
        with self._state:
            self.reals = (upper, *self.reals)
        return upper

    def replace_top(self, top: Real) -> Real:
        """The topmost real object changed (a mark or a redirect was added to it)."""
        top = adopt(top, self._cache)
        with self._state:
            old, self.reals = self.reals[0], (top, *self.reals[1:])
        _let_go(old)
        return top

    def attach_data(self, data: Real) -> bool:
        """A metacopy upper copy found its data (a lower file, :mod:`cowfs.core.metacopy`): it goes
        below it. False (the caller closes ``data``) when the stack changed meanwhile."""
        with self._state:
            if len(self.reals) != 1 or not self.reals[0].metacopy:
                return False
            self.reals = (self.reals[0], adopt(data, self._cache))
            return True

    @property
    def data(self) -> Real:
        """The real object holding the file's data: the topmost one that is not a metacopy file
        (below a metacopy copy, upper or lower, the data file that was found for it)."""
        reals = self.reals
        for real in reals:
            if not real.metacopy:
                return real
        if not reals:
            raise OSError(errno.ESTALE, "object released")
        raise OSError(errno.EIO, "metacopy file without data (see the log)")

    def replace_reals(self, reals: tuple[Real, ...]) -> None:
        reals = tuple(adopt(real, self._cache) for real in reals)
        with self._state:
            old, self.reals = self.reals, reals
        for real in old:
            _let_go(real)

    def add_link(self, parent: Inode, name: str) -> None:
        """Remember a name, as the most recently used one."""
        with self._state:
            links = self._links
            if len(links) == 2 and links[1] == name and links[0] is parent:
                return  # looked up again under its one name: the usual case
            self._links = (*_without(links, parent, name), parent, name)

    def linked_as(self, parent: Inode, name: str) -> bool:
        """Whether ``name`` in ``parent`` (this very parent inode) is one of this object's names."""
        links = self._links  # replaced as a whole: no lock needed
        for i in range(len(links) - 1, 0, -2):
            if links[i] == name and links[i - 1] is parent:
                return True
        return False

    def drop_link(self, parent: Inode, name: str) -> None:
        with self._state:
            self._links = _without(self._links, parent, name)

    def move_link(self, old_parent: Inode, old_name: str, new_parent: Inode,
                  new_name: str) -> None:
        with self._state:
            links = _without(_without(self._links, old_parent, old_name), new_parent, new_name)
            self._links = (*links, new_parent, new_name)

    def any_link(self) -> tuple[Inode, str] | None:
        """A live (parent, name) under which this object is visible, for copy-up: the most
        recently looked up, which is the likeliest to be the one being opened."""
        links = self._links  # replaced as a whole: no lock needed
        for i in range(len(links) - 2, -1, -2):
            parent = links[i]
            if isinstance(parent, Inode) and parent.alive:
                return parent, str(links[i + 1])
        return None

    def xattr_unless_absent(self, top: Real, name: str) -> bytes | None:
        """``top``'s xattr ``name`` (None: it has none), for the one xattr :attr:`absent_on` is
        about for this kind of object: an absence read once is remembered, and the next question
        answered without a system call. It is remembered only if no xattr changed since the
        read began (a setxattr in a worker thread may have added one meanwhile)."""
        if self.absent_on is top:
            return None
        changes = self._xattr_changes  # before the read: a change after it voids the absence
        value = top.getxattr(name)
        if value is None:
            with self._state:
                if self._xattr_changes == changes:
                    self.absent_on = top
        return value

    def xattrs_changed(self) -> None:
        """An xattr is being or was changed: forget any remembered absence, and make absences
        read before now not to be remembered."""
        with self._state:
            self._xattr_changes += 1
            self.absent_on = None

    def release(self) -> None:
        self.alive = False
        record = self.partial_data
        if record is not None:
            record.save()  # a partial file's map, while its reals are there (logged, not raised)
        with self._state:
            reals, self.reals = self.reals, ()
            self._links = ()
        for real in reals:
            _let_go(real)
        if record is not None:
            record.close()


class InodeTable:
    """All inodes the kernel knows about. Thread-safe: copy-ups run in worker threads."""

    def __init__(self, root_reals: tuple[Real, ...], numbers: InodeNumbers,
                 descriptors: Descriptors | None = None) -> None:
        self._lock = threading.Lock()
        self.numbers = numbers
        #: The descriptors of every real object the inodes reach (:mod:`cowfs.core.refs`).
        self.descriptors = descriptors if descriptors is not None else Descriptors(1 << 30)
        self.root = Inode(ROOT_NUMBER, root_reals, self.descriptors)
        self.root.lookups = 1  # the kernel never forgets the root
        self._by_number: dict[int, Inode] = {ROOT_NUMBER: self.root}
        #: Numbers given to objects whose number was claimed by another (see remember).
        self._spare: dict[tuple[int, int], int] = {}

    def __len__(self) -> int:
        return len(self._by_number)

    def release_all(self) -> None:
        """Drop every inode, the root included (the mount is gone: nobody can ask any more)."""
        with self._lock:
            inodes = list(self._by_number.values())
            self._by_number.clear()
        for inode in inodes:
            inode.release()
        self.descriptors.close()

    def get(self, number: int) -> Inode:
        try:
            return self._by_number[number]
        except KeyError:
            raise OSError(errno.ESTALE, "unknown inode") from None

    def remember(self, reals: tuple[Real, ...], parent: Inode | None, name: str, *,
                 origin: tuple[int, int] | None = None) -> Inode:
        """The inode for freshly resolved ``reals`` (taking ownership of their descriptors).

        Counts one kernel lookup. An object already known keeps its inode (the new descriptors are
        closed): the same number means the same object, unless :func:`same_object` says the real
        objects differ (a forged origin), when the newcomer gets a number of its own. ``origin``:
        ``(layer index, inode)`` of the real inode the object originates from, as lookup found it
        (:meth:`cowfs.daemon.namei.Namei.remember`); None for the object itself (one just
        created, which has no origin to read).
        """
        try:
            number = (self.numbers.own(reals[0]) if origin is None
                      else self.numbers.number(*origin))
        except BaseException:
            _close_all(reals)  # they were the caller's to hand over: nobody else closes them
            raise
        with self._lock:
            inode = self._by_number.get(number)
            if inode is not None and not same_object(inode.reals, reals):
                number = self._distinct_number(reals, number)
                inode = self._by_number.get(number)
            if inode is None:
                inode = Inode(number, reals, self.descriptors)
                self._by_number[number] = inode
            else:
                self._warm(inode, reals)
            inode.lookups += 1
        if parent is not None:
            inode.add_link(parent, name)
        return inode

    def holds(self, number: int, parent: Inode, name: str) -> bool:
        """Whether the kernel holds the inode numbered ``number`` under ``name`` in ``parent``
        (the inode is known and linked so). Its dentry may have gone meanwhile (a hard link's
        other name keeps the inode): a listing that shows the name without an inode then costs
        the kernel a lookup later, no more."""
        inode = self._by_number.get(number)  # one dict read: no lock needed
        return inode is not None and inode.alive and inode.linked_as(parent, name)

    def named_again(self, inode: Inode, parent: Inode, name: str) -> Inode | None:
        """``inode``, which got a new name (a hard link): one more kernel lookup, one more link.
        None if it was forgotten meanwhile."""
        with self._lock:
            if self._by_number.get(inode.number) is not inode:
                return None
            inode.lookups += 1
        inode.add_link(parent, name)
        return inode

    def _warm(self, inode: Inode, reals: tuple[Real, ...]) -> None:
        """A lookup's descriptors of objects ``inode`` knows already: cached under the inode's
        own references (the next request needs them), or closed. (A directory has one reference
        wherever it is found; a non-directory's is its inode's, :meth:`Descriptors.named`.)"""
        kept = {(r.at.dev, r.at.ino): r.at for r in inode.reals if r.at is not None}
        for real in reals:
            if real.held < 0:
                continue
            ref = None if real.at is None else kept.get((real.at.dev, real.at.ino))
            if ref is None or ref.pinned >= 0:
                os.close(real.held)
            else:
                self.descriptors.put(ref, real.held)

    def _distinct_number(self, reals: tuple[Real, ...], taken: int) -> int:
        """A number for an object whose number (from its origin) belongs to another object: its
        own, or else one from a range no layer's numbers fall in. Called with the lock held."""
        own = self.numbers.own(reals[0])
        known = self._by_number.get(own)
        if own != taken and (known is None or same_object(known.reals, reals)):
            number = own
        else:
            key = _identity(reals[0])
            number = self._spare.setdefault(key, _SPARE_BASE + len(self._spare))
        log.warning("inode %d is claimed by two different objects; the one in layer %d gets "
                    "inode %d", taken, reals[0].layer.index, number)
        return number

    def forget(self, number: int, count: int) -> None:
        with self._lock:
            inode = self._by_number.get(number)
            if inode is None or inode is self.root:
                return
            inode.lookups -= count
            if inode.lookups > 0:
                return
            del self._by_number[number]
        inode.release()


def _without(links: tuple[Inode | str, ...], parent: Inode,
             name: str) -> tuple[Inode | str, ...]:
    """``links`` (parent, name, parent, name, ...) without ``name`` in ``parent`` (by number: a
    parent looked up again after a forget is another ``Inode`` with the same number)."""
    kept: list[Inode | str] = []
    for i in range(0, len(links), 2):
        other, other_name = links[i], links[i + 1]
        if other_name != name or not isinstance(other, Inode) or other.number != parent.number:
            kept += (other, other_name)
    return tuple(kept)


#: Objects allocated (net) between two collections of Python's youngest generation, in the daemon.
_GC_YOUNG = 50_000


def collect_less() -> None:
    """For the daemon: collect garbage cycles less often. Every cached inode is a few objects
    that live long, and with Python's default (a young collection every 700 of them) the
    collector took 6-7% of the daemon's time in a walk of a large tree; the old generations
    keep their own rule (a full collection once they grew by a quarter)."""
    gc.set_threshold(_GC_YOUNG, *gc.get_threshold()[1:])


def adopt(real: Real, cache: Descriptors) -> Real:
    """``real`` as an inode keeps it: reached by its reference, whose descriptor the cache takes
    over (an object without a name to reach it by gets a pinned reference). Counts one
    holder."""
    if real.held >= 0:
        if real.at is None:
            ref = cache.pinned(real.held, os.fstat(real.held))
        else:
            ref = real.at
            cache.put(ref, real.held)
        real = real.kept(ref)
    if real.at is not None:
        real.at.cache.hold(real.at)
    return real


def _let_go(real: Real) -> None:
    """An inode no longer keeps ``real`` (:meth:`cowfs.core.refs.Descriptors.release`)."""
    if real.at is not None and real.held < 0:
        real.at.cache.release(real.at)


def _close_all(reals: Iterable[Real]) -> None:
    for real in reals:
        if real.held >= 0:
            os.close(real.held)
