"""Deep trees without recursion: a path of open directories from a root that holds a bounded
number of descriptors, and a cache of the directories of paths under one root.

Why: a tree 10,000 levels deep (a user's ``mv`` loop makes one by accident) must neither recurse
(Python's stack ends near 1,000 frames), nor keep one descriptor per level open (``RLIMIT_NOFILE``
is often 1,024), nor hand the kernel a path longer than ``PATH_MAX`` (4,096 bytes). So every
level is reached from the one above by name (an ``*at`` call that never follows a symlink), and
only some levels keep their descriptors: the newest half of the budget, and a thinning set of
older ones (each time the budget is full, every other older one is closed, so their gaps grow
geometrically). A closed level is opened again, by name from the nearest open one above it, when
a walk comes back to it, and must still be the directory it was (device and inode): the tools
describe a tree at rest, and one that moved under them is an error, not a silent mix-up.

Known limits: coming back up a tree deeper than the budget re-opens levels (each about
log2(depth / budget) times).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Generator, Iterator
from typing import Generic, TypeVar

from .errors import CowfsError

T = TypeVar("T")
R = TypeVar("R")

#: Levels a :class:`DirStack` keeps open at most (each holds a descriptor per layer).
LIMIT = 64


class MovedError(CowfsError):
    """A directory that a walk left and came back to is no longer there."""


class DirStack(Generic[T]):
    """The levels from a root (index 0, owned by the caller and never closed) to the current
    directory. A level is anything holding descriptors (``T``): ``reopen(parent, name)`` makes it
    again from its parent, ``close`` releases it, ``identity`` tells whether a re-opened level is
    the one that was closed."""

    def __init__(self, root: T, *, reopen: Callable[[T, str], T], close: Callable[[T], None],
                 identity: Callable[[T], object], limit: int = LIMIT) -> None:
        self._reopen = reopen
        self._close = close
        self._identity = identity
        self._limit = max(limit, 4)
        self._names: list[str] = [""]
        self._levels: list[T | None] = [root]
        self._ids: list[object] = [None]
        #: Indexes of the open levels, ascending.
        self._open: list[int] = [0]

    def __len__(self) -> int:
        return len(self._levels)

    def push(self, name: str, level: T) -> None:
        """A level below the current one, just opened (``name`` in the current directory)."""
        self._names.append(name)
        self._levels.append(level)
        self._ids.append(self._identity(level))
        self._opened(len(self._levels) - 1)

    def pop(self) -> None:
        """Leave the current level (closing it), back to its parent."""
        index = len(self._levels) - 1
        if index == 0:
            raise IndexError("the root is not popped")
        level = self._levels.pop()
        self._names.pop()
        self._ids.pop()
        if level is not None:
            self._open.pop()
            self._close(level)

    def top(self) -> T:
        """The current level, opened again (with any closed levels above it) when it was
        closed."""
        last = len(self._levels) - 1
        level = self._levels[last]
        if level is not None:
            return level
        start = last - 1
        while self._levels[start] is None:
            start -= 1
        for index in range(start + 1, last + 1):
            parent = self._levels[index - 1]
            assert parent is not None, "levels are re-opened from an open parent"
            try:
                again = self._reopen(parent, self._names[index])
            except OSError as e:
                raise MovedError(self._moved(index, e.strerror)) from None
            if self._identity(again) != self._ids[index]:
                self._close(again)
                raise MovedError(self._moved(index, "another directory is there now"))
            self._levels[index] = again
            self._opened(index)
        level = self._levels[last]
        assert level is not None, "re-opened above"
        return level

    def close(self) -> None:
        """Close every open level but the root."""
        for index in self._open[1:]:
            level = self._levels[index]
            if level is not None:
                self._close(level)
            self._levels[index] = None
        self._open = [0]

    def _moved(self, index: int, reason: str | None) -> str:
        shown = "/".join(self._names[1:index + 1])
        if len(shown) > 120:
            shown = f"{shown[:50]}...{shown[-50:]} ({index} levels)"
        return (f"{shown!r} moved while cowfs walked the tree ({reason}); run the command again "
                "on a tree at rest")

    def _opened(self, index: int) -> None:
        self._open.append(index)
        if len(self._open) > self._limit:
            self._thin(protect=index)

    def _thin(self, protect: int) -> None:
        recent = len(self._levels) - self._limit // 2
        older = [i for i in self._open[1:] if i < recent and i != protect]
        victims = set(older[1::2] or older)
        for index in victims:
            level = self._levels[index]
            assert level is not None, "only open levels are thinned"
            self._close(level)
            self._levels[index] = None
        self._open = [i for i in self._open if i not in victims]


def _open_dir_nofollow(dirfd: int, name: str) -> int:
    return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)


def _fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def fd_stack(root_fd: int, limit: int = LIMIT) -> DirStack[int]:
    """A :class:`DirStack` of directory descriptors (``O_PATH``), each opened from its parent
    by name without following a symlink."""
    return DirStack(root_fd, reopen=_open_dir_nofollow, close=os.close, identity=_fd_identity,
                    limit=limit)


class PathDirs:
    """The directories of paths under ``root_fd`` (``a/b/c`` is in ``a/b``), each component
    opened from its parent without following a symlink. The chain of the last directory is kept
    (bounded, see :class:`DirStack`), so the next path of a walk in tree order costs only the
    components that differ. ``create``: a missing directory on the way is made (mode 0755), by
    ``mkdir`` (the callback, one ``mkdirat``).

    The caller tells it what it changed: :meth:`forget` a directory removed, renamed or replaced,
    before the next path is asked for.
    """

    def __init__(self, root_fd: int, *, mkdir: Callable[[int, str], None] | None = None) -> None:
        self._stack = fd_stack(root_fd)
        self._mkdir = mkdir
        #: The path of the current directory ("" for the root), '/'-separated.
        self._current = ""

    def close(self) -> None:
        self._stack.close()

    def directory(self, path: str) -> int:
        """The descriptor of directory ``path`` ("" or "." for the root), valid until the next
        call; raises ``OSError`` (``ENOENT``, ``ENOTDIR`` for a symlink or a file on the way)."""
        path = "" if path == "." else path
        while not _is_under(path, self._current):
            self._stack.pop()
            self._current = self._current.rpartition("/")[0]
        rest = path[len(self._current):].lstrip("/")
        for name in rest.split("/") if rest else ():
            if name in ("", ".", ".."):  # ".." would leave the root, whatever O_NOFOLLOW says
                raise OSError(errno.EINVAL, f"invalid path component {name!r}", path)
            parent = self._stack.top()
            try:
                fd = _open_dir_nofollow(parent, name)
            except FileNotFoundError:
                if self._mkdir is None:
                    raise
                self._mkdir(parent, name)
                fd = _open_dir_nofollow(parent, name)
            self._stack.push(name, fd)
            self._current = f"{self._current}/{name}" if self._current else name
        return self._stack.top()

    @contextlib.contextmanager
    def parent_of(self, path: str) -> Iterator[tuple[int, str]]:
        """The parent directory of ``path`` and the last name (the shape of
        :func:`cowfs.tools.plans.parent_of`), as a descriptor of its own for the block (blocks
        may nest)."""
        parent, _, name = path.rpartition("/")
        if name in ("", ".", ".."):
            raise OSError(errno.EINVAL, f"invalid path component {name!r}", path)
        fd = os.dup(self.directory(parent))
        try:
            yield fd, name
        finally:
            os.close(fd)

    def forget(self, path: str) -> None:
        """``path`` was removed, renamed or replaced: its descriptors (and those below it) are
        no longer the directories at those names."""
        path = "" if path == "." else path
        while self._current and _is_under(self._current, path):
            self._stack.pop()
            self._current = self._current.rpartition("/")[0]


def _is_under(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it ("" is the root)."""
    if not top:
        return True
    return path.startswith(top) and (len(path) == len(top) or path[len(top)] == "/")


def join(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def depth_first(levels: DirStack[T], names: Callable[[str, T], list[str]],
                visit: Callable[[str, str, T], Generator[R, None, T | None]],
                top: str = ".") -> Iterator[R]:
    """Walk below the root of ``levels`` (at path ``top``, "." for a layer root) depth-first,
    parents before children, without recursion. ``names(path, level)``: a directory's names,
    taken from the end. ``visit(path, name, parent)`` yields a name's records and returns the
    level to walk below it (a directory) or None. Closes ``levels`` at the end."""
    paths = [top]
    pending = [names(top, levels.top())]
    try:
        while pending:
            if not pending[-1]:
                pending.pop()
                paths.pop()
                if pending:
                    levels.pop()
                continue
            name = pending[-1].pop()
            path = join(paths[-1], name)
            child = yield from visit(path, name, levels.top())
            if child is not None:
                levels.push(name, child)
                paths.append(path)
                pending.append(names(path, child))
    finally:
        levels.close()


def tree(root_fd: int, skip: Callable[[str], bool] = lambda path: False,
         ) -> Iterator[tuple[str, os.stat_result]]:
    """Every object below the directory ``root_fd``: its path ('/'-separated) and ``lstat``,
    directories before their content, names in directory order; never follows a symlink, any
    depth. ``skip(path)``: leave that object (and all below it) out."""
    for path, _, _, st in entries(root_fd, skip):
        yield path, st


def entries(root_fd: int, skip: Callable[[str], bool] = lambda path: False,
            ) -> Iterator[tuple[str, int, str, os.stat_result]]:
    """:func:`tree`, with the descriptor of each object's directory and its name there (valid
    until the iteration moves on), to open it with an ``*at`` call."""

    def visit(path: str, name: str, parent: int,
              ) -> Generator[tuple[str, int, str, os.stat_result], None, int | None]:
        if skip(path):
            return None
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return None  # removed while we looked
        yield path, parent, name, st
        if not stat.S_ISDIR(st.st_mode):
            return None
        try:
            return _open_dir_nofollow(parent, name)
        except (FileNotFoundError, NotADirectoryError):
            return None

    yield from depth_first(fd_stack(root_fd), lambda _path, fd: _names_of(fd), visit)


def _names_of(fd: int) -> list[str]:
    listing = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return os.listdir(listing)[::-1]
    finally:
        os.close(listing)
