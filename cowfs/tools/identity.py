"""The offline half of origin and number checking, for ``cowfs check``.

Every upper object (and every hard-link index entry) that carries an origin or a link count is
checked the way the mount reads it (:mod:`cowfs.core.origins`, :mod:`cowfs.core.schema`): a value
that is malformed or out of range, and with ``--lower`` an origin that does not verify, is a
finding. The mount ignores all of these (the object gets its own inode number, or its real link
count); the repair removes the xattr, which changes nothing the mount shows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

from ..core import origins, realfs, schema
from ..core.dirstack import DirStack, depth_first
from ..core.errors import CowfsError
from ..core.layers import Layer
from ..core.resolve import Real, read_redirect, resolve, root_real


@dataclass(frozen=True, slots=True)
class BadValue:
    """An xattr holding an origin or a name count that the mount ignores."""

    path: str  # below the upper root (index entries: below it too, in the work directory)
    xattr: str
    reason: str


def problems(upper: Path, lowers: Sequence[Path] | None,
             work: Path | None = None) -> Iterator[BadValue]:
    """Every ignored origin and name count in ``upper`` (origins are verified only with
    ``lowers``). ``work`` is the work directory (default ``UPPER/.cowfs-work``)."""
    with contextlib.ExitStack() as stack:
        layers = []
        for index, path in enumerate([upper, *(lowers or [])]):
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            stack.callback(os.close, fd)
            layers.append(Layer(index, path, fd, os.fstat(fd).st_dev,
                                is_bottom=index == len(lowers or []) and index > 0))
        roots = tuple(root_real(layer) for layer in layers)
        for root in roots:
            stack.callback(os.close, root.fd)
        scan = _Scan(roots, lowers is not None, _index_dir(upper, work, stack))
        yield from scan.directory(".", roots[0], roots)
        yield from scan.index_entries(upper, work)


def _index_dir(upper: Path, work: Path | None, stack: contextlib.ExitStack) -> int | None:
    path = (work or upper / schema.WORK_DIR_NAME) / schema.WORK_INDEX_NAME
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    stack.callback(os.close, fd)
    return fd


def _redirect(fd: int, layer: Layer) -> schema.Redirect | None:
    """A directory's redirect as the mount reads it (a refused one: none, as check reports it)."""
    try:
        return read_redirect(fd, layer, set(realfs.listxattr(fd)))
    except OSError:
        return None


@dataclass(slots=True)
class _Dir:
    """An upper object of the scan (a directory while it is walked): what the merge finds at
    its place (``found``, owned), and the merged directory's real directories (None where they
    cannot be resolved: a refused redirect, or no lower directory there)."""

    real: Real
    found: tuple[Real, ...]
    merged: tuple[Real, ...] | None

    def close(self) -> None:
        origins.close_reals(self.found)
        os.close(self.real.fd)
        self.found = ()

    def identity(self) -> tuple[int, int]:
        st = os.fstat(self.real.fd)
        return st.st_dev, st.st_ino


class _Scan:
    def __init__(self, roots: tuple[Real, ...], verify: bool, index_fd: int | None) -> None:
        self.roots = roots
        self.verify = verify
        self.index_fd = index_fd

    def directory(self, path: str, upper: Real,
                  merged: tuple[Real, ...] | None) -> Iterator[BadValue]:
        """``upper`` is the upper directory at ``path``; ``merged`` the merged directory's real
        directories (None where they cannot be resolved: a refused redirect). Depth-first
        without recursion, with a bounded number of descriptors (:mod:`cowfs.core.dirstack`)."""
        def visit(path: str, name: str, parent: _Dir) -> Generator[BadValue, None, _Dir | None]:
            child = self._open(parent, name, missing_ok=True)
            if child is None:
                return None
            try:
                yield from self.values(path, child.real, below=child.found[1:],
                                       parents=parent.merged or (), name=name)
            except BaseException:
                child.close()
                raise
            if stat.S_ISDIR(child.real.mode):
                return child
            child.close()
            return None

        frames = DirStack(_Dir(upper, (), merged), reopen=self._open, close=_Dir.close,
                          identity=_Dir.identity)
        yield from depth_first(frames, lambda path, level: self._names(path, level.real), visit,
                               path)

    @staticmethod
    def _names(path: str, upper: Real) -> list[str]:
        return sorted((name for name in realfs.list_names(upper.fd)
                       if not (path == "." and name == schema.WORK_DIR_NAME)), reverse=True)

    @overload
    def _open(self, parent: _Dir, name: str) -> _Dir: ...
    @overload
    def _open(self, parent: _Dir, name: str, missing_ok: bool) -> _Dir | None: ...

    def _open(self, parent: _Dir, name: str, missing_ok: bool = False) -> _Dir | None:
        """``name`` in the upper directory of ``parent``, and what the lowers merge there."""
        fd = realfs.open_path(parent.real.fd, name)
        if fd is None:
            if missing_ok:
                return None
            raise FileNotFoundError(errno.ENOENT, "gone")
        try:
            st = os.fstat(fd)
            real = Real(parent.real.layer, fd, st.st_mode, nlink=st.st_nlink, ino=st.st_ino,
                        redirect=_redirect(fd, parent.real.layer) if stat.S_ISDIR(st.st_mode)
                        else None)
            found: tuple[Real, ...] = ()
            if parent.merged is not None and self.verify:
                try:
                    found = resolve(parent.merged, self.roots, name)
                except OSError:
                    found = ()
        except BaseException:
            os.close(fd)
            raise
        return _Dir(real, found, found if found and found[0].is_dir else None)

    def values(self, path: str, real: Real, *, below: tuple[Real, ...] = (),
               parents: tuple[Real, ...] = (), name: str | None = None) -> Iterator[BadValue]:
        xattr = schema.origin_xattr(real.mode)
        try:
            origin = origins.read(real)
            reason = None if origin is None or not self.verify else origins.verify(
                origin, real, roots=self.roots, below=below, parents=parents, name=name,
                index_fd=self.index_fd)
        except ValueError as e:
            reason = str(e)
        if reason is not None:
            yield BadValue(path, xattr, reason)
        if not stat.S_ISDIR(real.mode):
            for count in (schema.XATTR_LOWER_LINKS, schema.XATTR_NLINK):
                value = realfs.getxattr(real.fd, count)
                if value is not None and schema.parse_number(value, schema.MAX_COUNT) is None:
                    yield BadValue(path, count, f"{value[:40]!r} is not a decimal number up to "
                                   f"{schema.MAX_COUNT}")

    def index_entries(self, upper: Path, work: Path | None) -> Iterator[BadValue]:
        if self.index_fd is None:
            return
        prefix = os.path.relpath(work or upper / schema.WORK_DIR_NAME, upper)
        for name in sorted(realfs.list_names(self.index_fd)):
            fd = realfs.open_path(self.index_fd, name)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                real = Real(self.roots[0].layer, fd, st.st_mode, nlink=st.st_nlink,
                            ino=st.st_ino, indexed=True)
                yield from self.values(f"{prefix}/{schema.WORK_INDEX_NAME}/{name}", real)
            finally:
                os.close(fd)


def drop(upper: Path, bad: BadValue) -> None:
    """The repair: remove the ignored xattr (what the mount shows does not change)."""
    root = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        *dirs, leaf = bad.path.split("/")
        fd = os.dup(root)
        try:
            for part in dirs:
                child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=fd)
                os.close(fd)
                fd = child
            target = os.open(leaf, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            realfs.removexattr(target, bad.xattr)
        except OSError as e:
            if e.errno != errno.ENODATA:
                raise CowfsError(f"cannot remove {bad.xattr} from {bad.path!r}: "
                                 f"{e.strerror}") from None
        finally:
            os.close(target)
    finally:
        os.close(root)
