"""The layer stack: which directories make up an overlay, opened once and held by descriptor.

The layers are opened before the filesystem is mounted and used only through these descriptors from
then on, which is what makes mounting over the base directory itself work: after the mount, the path
names the overlay, but the descriptors still name the layers underneath.

Known limits: as with the kernel's overlayfs, changing the layers behind cowfs's back while mounted
is undefined (the kernel caches cowfs's answers).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import realfs, schema, upperinfo
from .errors import CowfsError
from .workdir import WorkDir, lock_directory, open_work

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Layer:
    """One directory of the stack. Index 0 is the upper; lowers follow, topmost first."""

    index: int
    path: Path
    root_fd: int
    dev: int

    #: Whether this is the lowest layer (its redirects point nowhere and are not read).
    is_bottom: bool = False
    #: A lower layer that is a cowfs upper (its root carries ``user.cowfs.format``): the only
    #: kind of lower layer whose files cowfs reads metacopy marks on (:func:`holds_metacopy`).
    cowfs_upper: bool = False
    #: Whether the layer's filesystem keeps inode numbers across mounts
    #: (:func:`realfs.numbers_last`).
    #: Where it may not (FUSE, network filesystems), nothing cowfs writes names a lower object by
    #: its number: copies record no origin (they get numbers of their own, as in the kernel's
    #: overlayfs over a lower without file handles), keep no data behind (no metacopy or partial
    #: copy, whose data an origin finds), and hard-link sets are not copied up through the index.
    numbers_last: bool = True

    @property
    def is_upper(self) -> bool:
        return self.index == 0

    @property
    def reads_metacopy(self) -> bool:
        """Whether a marked regular file of this layer is a metacopy file: in the upper, and in
        a lower layer that a cowfs mount wrote as its upper. Elsewhere the mark is not read,
        which saves a system call (a getxattr, about 10 µs) per lookup of a lower file."""
        return self.is_upper or self.cowfs_upper


def holds_metacopy(root_fd: int) -> bool:
    """Whether a lower layer's root says it is a cowfs upper (which may hold metacopy files)."""
    try:
        return realfs.getxattr(root_fd, schema.XATTR_FORMAT) is not None
    except PermissionError:
        return False


def parse_lowers(spec: str) -> tuple[Path, ...]:
    """``LOWER[:LOWER...]`` (topmost first, as the kernel's lowerdir): the one parser of it."""
    names = spec.split(":")
    if not spec or any(not n for n in names):
        raise CowfsError(f"invalid lower directory list {spec!r}: empty element")
    return tuple(Path(n) for n in names)


@dataclass(frozen=True, slots=True)
class LayerPaths:
    """The directories named on the command line, before anything is opened."""

    lowers: tuple[Path, ...]
    upper: Path
    work: Path | None = None

    @classmethod
    def parse(cls, lower: str, upper: str, work: str | None = None) -> LayerPaths:
        """Parse ``LOWER[:LOWER...]`` (topmost first, as the kernel's lowerdir) and the others."""
        return cls(parse_lowers(lower), Path(upper), Path(work) if work else None)

    def resolved(self) -> LayerPaths:
        """Absolute, symlink-free paths. Taken before mounting: afterwards, a path under the
        mountpoint would be answered by this very process, which would wait for itself."""
        return LayerPaths(tuple(p.resolve() for p in self.lowers), self.upper.resolve(),
                          self.work.resolve() if self.work is not None else None)

    @property
    def work_dir(self) -> Path:
        return self.work if self.work is not None else schema.default_work_dir(self.upper)


@dataclass(frozen=True, slots=True)
class LayerStack:
    """The opened layers and the work directory."""

    upper: Layer
    lowers: tuple[Layer, ...]
    #: ``WORK`` with its ``tmp/`` and ``index/`` (:mod:`cowfs.core.workdir`).
    work: WorkDir
    #: Holds the lock that keeps a second mount off this upper.
    upper_lock_fd: int
    read_only: bool = False

    @property
    def all(self) -> tuple[Layer, ...]:
        return (self.upper, *self.lowers)

    def close(self) -> None:
        for layer in self.all:
            os.close(layer.root_fd)
        self.work.close()
        os.close(self.upper_lock_fd)


def _open_dir(path: Path, role: str) -> int:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CowfsError(f"{role} directory {str(path)!r} does not exist") from None
    except OSError as e:
        raise CowfsError(f"cannot use {role} directory {str(path)!r}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CowfsError(f"{role} {str(path)!r} is not a directory")
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _is_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_user_xattrs(fd: int, path: Path) -> None:
    """The upper must hold ``user.*`` xattrs, or whiteouts and opaque dirs cannot be recorded."""
    probe = schema.COWFS_PREFIX + "probe"
    try:
        realfs.setxattr(fd, probe, b"1")
        realfs.removexattr(fd, probe)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EPERM):
            raise CowfsError(
                f"upper directory {str(path)!r} is on a filesystem without user extended "
                "attributes (needed for whiteouts); use e.g. ext4, xfs, btrfs or tmpfs") from None
        raise CowfsError(f"cannot write to upper directory {str(path)!r}: {e.strerror}") from None


def check_mountpoint_outside(paths: LayerPaths, mountpoint: Path) -> None:
    """A mountpoint strictly inside a layer would make cowfs look itself up and wait for itself.
    Mounting exactly over a layer (in place) is fine: the layers are opened before mounting."""
    for role, layer in [*(("lower", p) for p in paths.lowers), ("upper", paths.upper),
                        ("work", paths.work_dir)]:
        if mountpoint != layer and _is_inside(mountpoint, layer):
            raise CowfsError(f"mountpoint {str(mountpoint)!r} is inside the {role} directory "
                             f"{str(layer)!r}; mount it over the directory itself or elsewhere")


def _validate_nesting(paths: LayerPaths, work: Path | None) -> None:
    upper = paths.upper.resolve()
    for lower in paths.lowers:
        lower = lower.resolve()
        if _is_inside(upper, lower):
            raise CowfsError(f"upper directory {str(paths.upper)!r} is inside lower directory "
                             f"{str(lower)!r}; lower layers must never be written")
        if work is not None and _is_inside(work, lower):
            raise CowfsError(f"work directory {str(work)!r} is inside lower directory "
                             f"{str(lower)!r}; lower layers must never be written")
        if _is_inside(lower, upper):
            raise CowfsError(f"lower directory {str(lower)!r} is inside the upper directory")
    if work is not None and _is_inside(work, upper):
        raise CowfsError(f"work directory {str(work)!r} is inside the upper directory, where it "
                         "would be visible; leave --work out to use the default hidden one")
    if work is not None and _is_inside(upper, work):
        raise CowfsError("upper directory is inside the work directory")


def check_nesting(paths: LayerPaths) -> None:
    """The nesting rules alone, for a caller that creates the upper: checked before it does."""
    _validate_nesting(paths, paths.work.resolve() if paths.work is not None else None)


def open_stack(paths: LayerPaths, *, read_only: bool = False,
               relocate: bool = False) -> LayerStack:
    """Check the layers and open them; every problem becomes a one-line :class:`CowfsError`.

    Everything that can refuse the stack is checked before anything is written: the format, the
    lower stack and the work directory recorded on the upper (``relocate`` accepts others and
    records them), an unfinished commit, layers given swapped. A read-only stack writes nothing
    at all: no format marker, no work directory, no xattr probe, no stack record.
    """
    lower_fds = [_open_dir(p, "lower") for p in paths.lowers]
    upper_fd = _open_dir(paths.upper, "upper")
    _validate_nesting(paths, paths.work.resolve() if paths.work is not None else None)
    _check_format(upper_fd, paths.upper)
    upperinfo.refuse_if_committing(paths.upper, "mount")
    identities = tuple(upperinfo.identity_of(p, fd)
                       for p, fd in zip(paths.lowers, lower_fds, strict=True))
    upperinfo.refuse_swapped(paths.upper, upper_fd, paths.lowers)
    upperinfo.verify_stack(paths.upper, identities, relocate=relocate, what="mount",
                           override="-o relocate to record the new stack")
    upperinfo.verify_work(paths.upper, paths.work, relocate=relocate)
    upper_dev = os.fstat(upper_fd).st_dev
    upper_lock = lock_directory(upper_fd, paths.upper, "upper directory")
    try:
        if not read_only:
            _check_user_xattrs(upper_fd, paths.upper)
        work = open_work(upper_fd, paths.upper, paths.work, read_only=read_only,
                         relocate=relocate)
    except BaseException:
        os.close(upper_lock)
        raise
    if not read_only:
        _mark_format(upper_fd, paths.upper)
        upperinfo.record_stack(upper_fd, paths.upper, identities, paths.work)
    upper = Layer(0, paths.upper, upper_fd, upper_dev)
    lowers = tuple(Layer(i + 1, p, fd, os.fstat(fd).st_dev, is_bottom=i == len(lower_fds) - 1,
                         cowfs_upper=holds_metacopy(fd), numbers_last=realfs.numbers_last(fd))
                   for i, (p, fd) in enumerate(zip(paths.lowers, lower_fds, strict=True)))
    return LayerStack(upper, lowers, work, upper_lock, read_only)


def _check_format(upper_fd: int, path: Path) -> None:
    upperinfo.upper_format(upper_fd, path)


def _mark_format(upper_fd: int, path: Path) -> None:
    if not upperinfo.upper_format(upper_fd, path):
        realfs.setxattr(upper_fd, schema.XATTR_FORMAT, schema.FORMAT_VERSION)
