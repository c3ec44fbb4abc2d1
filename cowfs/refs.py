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
is not reused meanwhile). One ``Ref`` stands for one real object (:meth:`Descriptors.named` finds
the existing one by identity), so every inode and every child reaches it through the same one,
and one update moves it for all.

A descriptor handed out by :meth:`Ref.fd` stays open until the request that got it ends: the cache
is trimmed to its size only when a request ends (:meth:`Descriptors.end`), and what it drops is
closed only when every request that was running then has ended (epochs, as in read-copy-update).
Without requests (the model driven directly, in tests) the cache is never trimmed.

A real object with no name to reach it by (a metacopy file's data, found through its origin) is
pinned from the start. Layer roots are pinned.

Known limits: a request that runs long (a copy-up of a large file) delays closing the descriptors
the cache dropped meanwhile; an object renamed in the upper by someone else than cowfs (which is
not supported) fails ``ESTALE`` instead of being found.
"""

from __future__ import annotations

import errno
import os
import threading
import weakref
from collections import OrderedDict, deque

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


class Descriptors:
    """The descriptors of the real objects of one mount: a bounded cache, and the requests in
    flight that decide when a dropped descriptor may be closed."""

    def __init__(self, size: int) -> None:
        self.size = max(size, 8)
        self._lock = threading.Lock()
        self._lru: OrderedDict[Ref, int] = OrderedDict()
        #: One Ref per real object, by (device, inode), while anything holds it.
        self._known: weakref.WeakValueDictionary[tuple[int, int], Ref] = (
            weakref.WeakValueDictionary())
        self._clock = 0
        self._active: dict[int, None] = {}
        #: Dropped descriptors, with the clock when they were dropped, oldest first.
        self._retired: deque[tuple[int, int]] = deque()

    # --- making references --------------------------------------------------------------------

    def pinned(self, fd: int, st: os.stat_result) -> Ref:
        """A reference held by ``fd`` (taken over) for good: a layer root, or an object that has
        no name to be reached by."""
        return Ref(self, st.st_dev, st.st_ino, _is_dir(st), None, pinned=fd)

    def named(self, parent: Ref, name: str, st: os.stat_result) -> Ref:
        """The reference of the object ``st`` describes, just found at ``name`` in ``parent``.
        An object already known keeps its reference (whose name cowfs kept up to date), unless
        its name went (it then gets this one)."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            ref = self._known.get(key)
            if ref is None or ref.is_dir != _is_dir(st):
                ref = Ref(self, st.st_dev, st.st_ino, _is_dir(st), (parent, name))
                self._known[key] = ref
            elif ref.where is None and ref.pinned < 0:
                ref.where = (parent, name)
            return ref

    # --- descriptors --------------------------------------------------------------------------

    def fd(self, ref: Ref) -> int:
        with self._lock:
            fd = self._lru.get(ref)
            if fd is not None:
                self._lru.move_to_end(ref)
                return fd
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
                base = cached
                break
            chain.append(parent)
        for node in reversed(chain):
            fd = self._open_one(node, base)
            if fd is None:
                return None
            base = self.put(node, fd)
        return base

    @staticmethod
    def _open_one(node: Ref, parent_fd: int) -> int | None:
        """``node`` opened in the directory ``parent_fd`` by its name (or the name it is moving
        to), checked to be the object it stands for."""
        for where in (node.where, node.next):
            if where is None:
                continue
            try:
                fd = os.open(where[1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            except (FileNotFoundError, NotADirectoryError):
                continue
            try:
                st = os.fstat(fd)
            except BaseException:
                os.close(fd)
                raise
            if (st.st_dev, st.st_ino) == (node.dev, node.ino):
                return fd
            os.close(fd)  # another object is at that name now: never handed out
        return None

    def put(self, ref: Ref, fd: int) -> int:
        """Take over ``fd``, a descriptor of ``ref``'s object, as its cached one; the descriptor
        the cache holds for it (``fd``, or one cached meanwhile, ``fd`` then dropped)."""
        with self._lock:
            known = self._lru.get(ref)
            if known is None:
                self._lru[ref] = fd
                return fd
            if known != fd:
                self._retired.append((self._clock, fd))
            return known

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
            self._retired.append((self._clock, fd))

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

    # --- requests -----------------------------------------------------------------------------

    def begin(self) -> int:
        """A request starts; its token goes to :meth:`end`."""
        with self._lock:
            self._clock += 1
            token = self._clock
            self._active[token] = None
            return token

    def end(self, token: int) -> None:
        """A request ended: the cache is trimmed to its size, and what no running request can
        still be using is closed."""
        with self._lock:
            self._active.pop(token, None)
            while len(self._lru) > self.size:
                _, fd = self._lru.popitem(last=False)
                self._retired.append((self._clock, fd))
            oldest = min(self._active, default=self._clock + 1)
            closing = []
            while self._retired and self._retired[0][0] < oldest:
                closing.append(self._retired.popleft()[1])
        for fd in closing:
            os.close(fd)

    def open_count(self) -> int:
        """Descriptors held now (cached and waiting to be closed; pinned ones not counted)."""
        with self._lock:
            return len(self._lru) + len(self._retired)

    def close(self) -> None:
        """Close everything cached or dropped (the mount is gone)."""
        with self._lock:
            fds = [*self._lru.values(), *(fd for _, fd in self._retired)]
            self._lru.clear()
            self._retired.clear()
        for fd in fds:
            os.close(fd)


def _is_dir(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o040000
