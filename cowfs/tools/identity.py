"""The offline half of origin and number checking, for ``cowfs check``.

Every upper object (and every hard-link index entry) that carries an origin or a link count is
checked the way the mount reads it (:mod:`cowfs.origins`, :mod:`cowfs.schema`): a value that is
malformed or out of range, and with ``--lower`` an origin that does not verify, is a finding. The
mount ignores all of these (the object gets its own inode number, or its real link count); the
repair removes the xattr, which changes nothing the mount shows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import origins, realfs, schema
from ..errors import CowfsError
from ..layers import Layer
from ..resolve import Real, read_redirect, resolve, root_real
from ..walk import join


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


class _Scan:
    def __init__(self, roots: tuple[Real, ...], verify: bool, index_fd: int | None) -> None:
        self.roots = roots
        self.verify = verify
        self.index_fd = index_fd

    def directory(self, path: str, upper: Real,
                  merged: tuple[Real, ...] | None) -> Iterator[BadValue]:
        """``upper`` is the upper directory at ``path``; ``merged`` the merged directory's real
        directories (None where they cannot be resolved: a refused redirect)."""
        for name in sorted(realfs.list_names(upper.fd)):
            if path == "." and name == schema.WORK_DIR_NAME:
                continue
            fd = realfs.open_path(upper.fd, name)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                real = Real(upper.layer, fd, st.st_mode, nlink=st.st_nlink, ino=st.st_ino,
                            redirect=_redirect(fd, upper.layer) if stat.S_ISDIR(st.st_mode)
                            else None)
                yield from self._entry(join(path, name), name, real, merged)
            finally:
                os.close(fd)

    def _entry(self, path: str, name: str, real: Real,
               merged: tuple[Real, ...] | None) -> Iterator[BadValue]:
        found: tuple[Real, ...] = ()
        if merged is not None and self.verify:
            try:
                found = resolve(merged, self.roots, name)
            except OSError:
                found = ()
        try:
            yield from self.values(path, real, below=found[1:], parents=merged or (), name=name)
            if stat.S_ISDIR(real.mode):
                children = found if found and found[0].is_dir else None
                yield from self.directory(path, real, children if self.verify else None)
        finally:
            origins.close_reals(found)

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
