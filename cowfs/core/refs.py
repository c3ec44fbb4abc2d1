"""Name references: how an inode reaches its real objects without holding a descriptor for each.

Why: an inode the kernel keeps used to hold an ``O_PATH`` descriptor per layer, so how many files
cowfs could keep warm depended on the descriptor limit (issue 19). Now a real object an inode
knows is a :class:`Ref`: its parent directory's ``Ref`` and its name there, and the identity
(device, inode) that the lookup saw. Its descriptor lives in one bounded cache per mount
(:class:`Descriptors`, least recently used first out), and is opened again when it is needed:
from the parent's descriptor (itself cached, or opened again the same way, up to a layer root,
whose descriptor is held for the whole mount), with ``openat(O_PATH | O_NOFOLLOW)`` one name at
a time. Every descriptor opened so is checked against the identity the lookup saw: a name that
now reaches another object fails with ``ESTALE``, never reaches that object.

Names change only where cowfs changes them: lower layers never change while mounted, and cowfs is
the only writer of the upper. Its renames move the ``Ref`` of the object renamed (under the
namespace lock, before and after the ``renameat2``: :meth:`Descriptors.moving`), and before a name
that an inode still reaches an object by goes away (unlink, rename over it), that object's
descriptor is *pinned*: opened now and held until the last inode holding it is forgotten (an
unlinked object stays reachable, as a held descriptor kept it before; a deleted inode's number
is not reused meanwhile). One ``Ref`` stands for one real directory (:meth:`Descriptors.named`
finds the existing one by identity), so every inode and every child reaches it through the same
one, and one update moves it for all; a non-directory is reached only by its inode, which holds
its one ``Ref``.

A descriptor handed out by :meth:`Ref.fd` stays open while it can be in use. The cache closes
what it drops only on the request loop's thread, at the end of a request (:meth:`Descriptors.trim`):
requests answered there use the descriptors they get before they wait for anything (the model
returns results, never descriptors), so at that moment none is between getting a descriptor and
using it. Work handed to a worker thread runs in :func:`in_worker`, which counts every cached
descriptor it gets as used until it returns: a used one that the cache drops is closed by the
last worker using it. (A plain grace period would not do: the first version waited for every
request running when a descriptor was dropped, and one copy-up waiting for fsync let a parallel
walk's dropped descriptors pile up past a limit of 256.) Without requests (the model driven
directly, in tests) the cache is never trimmed.

Layer roots and the index directory are pinned. A real object found without a parent's
reference (a model built without a cache, in tests) is pinned when an inode takes it.

Known limits: a worker that runs long (a copy-up of a large file) keeps open the descriptors it
used until it returns, dropped ones too; an object renamed in the upper by someone else than cowfs
(which is not supported) fails ``ESTALE`` instead of being found; a directory's ``Ref`` stays in
the table of references while the cache or a child holds it, and forget does not drop a cached
descriptor (the cache's bound does). Every lookup of a non-directory makes a reference (two
names of a hard link, or a name looked up again): the inode keeps its first, and a later one's
descriptor is cached under it (:meth:`cowfs.inodes.InodeTable.remember`).
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Attempts at reaching an object by name while its name (or a parent's) is being moved.
_ATTEMPTS = 3


class Ref:
    """One real object, reached by its parent directory's :class:`Ref` and its name there, or
    held by a pinned descriptor."""

    __slots__ = ("__weakref__", "cache", "dev", "holders", "ino", "is_dir", "next", "pinned",
                 "where")

    def __init__(self, cache: Descriptors, dev: int, ino: int, is_dir: bool,
                 where: tuple[Ref, str] | None, pinned: int = -1) -> None:
        self.cache = cache
        self.dev = dev
        self.ino = ino
        self.is_dir = is_dir
        #: (parent, name), replaced as a whole; None once the name is gone.
        self.where = where
        #: While a rename moves it: the name it is moving to (tried when ``where`` fails).
        self.next: tuple[Ref, str] | None = None
        #: A descriptor held for good (a layer root, an object whose name went), else -1.
        self.pinned = pinned
        #: Inodes holding it (:meth:`Descriptors.hold`): a pinned descriptor lives as long.
        self.holders = 0

    def __repr__(self) -> str:
        name = self.where[1] if self.where is not None else None
        return f"<Ref {self.dev}:{self.ino} {name!r}{' pinned' if self.pinned >= 0 else ''}>"

    def fd(self) -> int:
        """An ``O_PATH`` descriptor of the object, valid until the current request ends."""
        if self.pinned >= 0:
            return self.pinned
        return self.cache.fd(self)


class _Entry:
    """A cached descriptor and the worker sections using it."""

    __slots__ = ("dropped", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        #: Out of the cache while in use: the last user closes it.
        self.dropped = False


class _Local(threading.local):
    #: Per worker thread, inside :func:`in_worker`: the entries it used. (A class attribute, so
    #: that reading it on the loop's thread is a plain attribute read: ``getattr`` with a
    #: default on a missing attribute costs an exception, 0.4 µs, at each descriptor used.)
    used: list[tuple[Descriptors, _Entry]] | None = None


_local = _Local()


def in_worker(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a worker thread: every descriptor it gets from a cache stays open until
    it returns, even if the cache drops it meanwhile."""
    used: list[tuple[Descriptors, _Entry]] = []
    _local.used = used
    try:
        return fn(*args)
    finally:
        _local.used = None
        for cache, entry in used:
            cache._unuse(entry)


class Descriptors:
    """The descriptors of the real objects of one mount: a bounded cache (least recently used
    first out), and what it dropped that is still in use."""

    def __init__(self, size: int) -> None:
        self.size = max(size, 0)
        self._lock = threading.Lock()
        self._lru: OrderedDict[Ref, _Entry] = OrderedDict()
        #: One Ref per real directory, by (device, inode), while anything holds it.
        self._known: weakref.WeakValueDictionary[tuple[int, int], Ref] = (
            weakref.WeakValueDictionary())
        #: Dropped on a path where closing could pull one from under its user: closed at the
        #: next :meth:`trim`.
        self._later: list[int] = []
        #: Dropped while a worker uses them: closed by the last one (:meth:`_unuse`).
        self._in_use = 0

    # --- making references --------------------------------------------------------------------

    def pinned(self, fd: int, st: os.stat_result) -> Ref:
        """A reference held by ``fd`` (taken over) for good: a layer root, or an object that has
        no name to be reached by."""
        return Ref(self, st.st_dev, st.st_ino, _is_dir(st), None, pinned=fd)

    def named(self, parent: Ref, name: str, st: os.stat_result) -> Ref:
        """The reference of the object ``st`` describes, just found at ``name`` in ``parent``.

        A directory already known keeps its reference (whose name cowfs kept up to date, and
        which its children's references name as their parent), unless its name went (it then
        gets this one). A non-directory gets a new one, which the inode it makes holds: an inode
        already known for it keeps its own (:meth:`cowfs.inodes.InodeTable.remember`), and no
        other reference names it as a parent. (A table entry for every file cost about 200
        bytes of each cached inode.)"""
        dev = parent.dev if parent.dev == st.st_dev else st.st_dev  # one int for the layer
        if not _is_dir(st):
            return Ref(self, dev, st.st_ino, False, (parent, name))
        key = (dev, st.st_ino)
        with self._lock:
            ref = self._known.get(key)
            if ref is None or not ref.is_dir:
                ref = Ref(self, dev, st.st_ino, True, (parent, name))
                self._known[key] = ref
            elif ref.where is None and ref.pinned < 0:
                ref.where = (parent, name)
            return ref

    # --- descriptors --------------------------------------------------------------------------

    def cached(self, ref: Ref) -> bool:
        """Whether ``ref``'s descriptor is in the cache now."""
        return ref in self._lru

    def fd(self, ref: Ref) -> int:
        with self._lock:
            entry = self._lru.get(ref)
            if entry is not None:
                self._lru.move_to_end(ref)
                return self._use(entry)
        for _ in range(_ATTEMPTS):
            fd = self._open(ref)
            if fd is not None:
                return fd
        raise OSError(errno.ESTALE, f"{ref!r} is no longer at its name")

    def _open(self, ref: Ref) -> int | None:
        """Open ``ref`` and the uncached directories above it, top-down (no recursion: a tree
        may be deeper than Python's stack); None when a name moved meanwhile (try again)."""
        chain = [ref]
        base = -1
        while True:
            node = chain[-1]
            if node.next is not None:  # being renamed: by either name, each from its parent
                base = self._open_moving(node)
                if base < 0:
                    return None
                chain.pop()
                break
            where = node.where
            if where is None:
                raise OSError(errno.ESTALE, f"{ref!r} has no name left")
            parent = where[0]
            if parent.pinned >= 0:
                base = parent.pinned
                break
            with self._lock:
                cached = self._lru.get(parent)
                if cached is not None:
                    base = self._use(cached)
            if cached is not None:
                break
            chain.append(parent)
        for node in reversed(chain):
            where = node.where
            fd = None if where is None else _open_checked(node, where[1], base)
            if fd is None:
                return None
            base = self.put(node, fd)
        return base

    def _open_moving(self, node: Ref) -> int:
        """A reference being renamed (:meth:`moving`), by its old name or its new one."""
        for where in (node.where, node.next):
            if where is None:
                continue
            try:
                parent_fd = where[0].fd()
            except OSError:
                continue
            fd = _open_checked(node, where[1], parent_fd)
            if fd is not None:
                return self.put(node, fd)
        return -1

    def put(self, ref: Ref, fd: int) -> int:
        """Take over ``fd``, a descriptor of ``ref``'s object, as its cached one; the descriptor
        the cache holds for it (``fd``, or one cached meanwhile, ``fd`` then dropped)."""
        with self._lock:
            entry = self._lru.get(ref)
            if entry is None:
                entry = self._lru[ref] = _Entry(fd)
            elif entry.fd != fd:
                self._drop_later(fd)
            return self._use(entry)

    def _use(self, entry: _Entry) -> int:
        """``entry``'s descriptor, counted as used by the worker asking (lock held)."""
        used = _local.used
        if used is not None:
            entry.users += 1
            used.append((self, entry))
        return entry.fd

    def _unuse(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            if not (entry.dropped and entry.users == 0):
                return
            self._in_use -= 1
        os.close(entry.fd)  # out of the cache: nobody else can have it

    def _drop_later(self, fd: int) -> None:
        """A descriptor someone may still be using on this path (lock held)."""
        used = _local.used
        if used is not None:  # a worker's: closed when it returns
            entry = _Entry(fd)
            entry.users, entry.dropped = 1, True
            self._in_use += 1
            used.append((self, entry))
        else:
            self._later.append(fd)

    def hold(self, ref: Ref) -> None:
        with self._lock:
            ref.holders += 1

    def release(self, ref: Ref) -> None:
        """An inode let ``ref`` go: with the last one, a pinned descriptor is dropped."""
        with self._lock:
            ref.holders -= 1
            if ref.holders > 0 or ref.pinned < 0:
                return
            fd, ref.pinned = ref.pinned, -1
            self._drop_later(fd)

    # --- names cowfs changes (called under the namespace lock) -------------------------------

    def moving(self, ref: Ref, old: tuple[Ref, str], new: tuple[Ref, str]) -> bool:
        """A rename of ``old`` to ``new`` is about to be made; if ``ref`` is reached by ``old``,
        it will be reached by ``new`` (True: call :meth:`moved` or :meth:`not_moved` after)."""
        where = ref.where
        if where is None or where[0] is not old[0] or where[1] != old[1]:
            return False
        ref.next = new
        return True

    @staticmethod
    def moved(ref: Ref) -> None:
        """The rename :meth:`moving` announced was made."""
        if ref.next is not None:
            ref.where, ref.next = ref.next, None

    @staticmethod
    def not_moved(ref: Ref) -> None:
        ref.next = None

    def leaving(self, ref: Ref, old: tuple[Ref, str]) -> None:
        """The name ``old`` is about to go (unlinked, renamed over, moved away for good): if
        ``ref`` is reached by it and an inode holds ``ref``, its descriptor is pinned first."""
        where = ref.where
        if ref.pinned >= 0 or where is None or where[0] is not old[0] or where[1] != old[1]:
            return
        if ref.holders > 0:
            fd = os.dup(ref.fd())
            with self._lock:
                ref.pinned = fd
        ref.where = None

    # --- bounds -----------------------------------------------------------------------------

    def trim(self) -> None:
        """Called on the request loop's thread when a request ends: the cache down to its size;
        what it drops is closed now, or by the last worker using it."""
        if not self._later and len(self._lru) <= self.size:
            return  # most requests: nothing to close, and the cache within its size
        closing, self._later = self._later, []
        with self._lock:
            while len(self._lru) > self.size:
                _, entry = self._lru.popitem(last=False)
                if entry.users:
                    entry.dropped = True
                    self._in_use += 1
                else:
                    closing.append(entry.fd)
        for fd in closing:
            os.close(fd)

    def open_count(self) -> int:
        """Descriptors held now: cached, dropped but in use or not closed yet (pinned ones not
        counted)."""
        with self._lock:
            return len(self._lru) + self._in_use + len(self._later)

    def close(self) -> None:
        """Close everything cached or dropped (the mount is gone, no worker runs)."""
        with self._lock:
            fds = [entry.fd for entry in self._lru.values()] + self._later
            self._lru.clear()
            self._later = []
        for fd in fds:
            os.close(fd)


def _open_checked(node: Ref, name: str, parent_fd: int) -> int | None:
    """``name`` opened in the directory ``parent_fd`` without following a symlink, if it is
    the object ``node`` stands for (None otherwise: another object is never handed out)."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if (st.st_dev, st.st_ino) == (node.dev, node.ino):
        return fd
    os.close(fd)
    return None


def _is_dir(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o040000
