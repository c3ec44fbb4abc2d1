"""The Python API: a writable copy-on-write view of a directory, as a context manager.

>>> import cowfs
>>> with cowfs.overlay("/data/corpus") as view:          # doctest: +SKIP
...     (view.path / "labels.csv").write_text("...")
...     print(view.diff())                                # what changed, as walk records
...     view.discard()                                    # or view.commit() into the base

The view is a real cowfs mount (``cowfs mount``, run as a subprocess: the daemon never forks the
caller's process), so any program can use ``view.path``. It is unmounted on leaving the ``with``
block, also after an exception; a temporary upper is deleted then unless ``keep=True``.

Known limits: ``commit`` and ``discard`` unmount and mount again (a commit must never run under a
live mount), so files opened under ``view.path`` must be closed first, and inode numbers change.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..core import lifecycle, mounts
from ..core.errors import CowfsError
from ..core.layers import LayerPaths, check_nesting
from . import outputs, plans
from .changes import summary, visible_changes
from .walk import Change, walk
from .workspace import (
    UpperOrigin,
    commit,
    discard_upper,
    empty_upper,
    refuse_to_discard,
    upper_origin,
)

PathLike = str | os.PathLike[str]


def _lower_list(base: PathLike | Sequence[PathLike]) -> tuple[Path, ...]:
    if isinstance(base, str | os.PathLike):
        return (Path(base),)
    lowers = tuple(Path(p) for p in base)
    if not lowers:
        raise CowfsError("at least one lower directory is needed")
    return lowers


def match_root(upper: Path, base: Path) -> None:
    """Give a fresh upper the base root's mode, owner and times: the mount shows the upper's root
    as the view's root, and a ``mkdtemp`` directory (mode 0700) would hide the base's."""
    if any(upper.iterdir()):
        return
    st = os.stat(base)
    with contextlib.suppress(PermissionError):
        os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, st.st_mode & 0o7777)
    os.utime(upper, ns=(st.st_atime_ns, st.st_mtime_ns))


def mount(lowers: Sequence[Path], upper: Path, mountpoint: Path,
          options: Sequence[str] = ()) -> None:
    """``cowfs mount`` in a subprocess; returns once the filesystem serves requests."""
    lifecycle.mount_in_subprocess(lowers, upper, mountpoint, options)


def unmount(mountpoint: Path) -> None:
    """``cowfs umount``, retrying for a few seconds while the mount is busy, then detaching it."""
    lifecycle.unmount_when_idle(mountpoint)


class View:
    """A mounted copy-on-write view; see :func:`overlay`."""

    def __init__(self, lowers: tuple[Path, ...], upper: Path, path: Path,
                 options: Sequence[str] = ()) -> None:
        self.lowers = lowers
        #: Where the writable layer lives: exactly what changed.
        self.upper = upper
        #: Where the merged view is mounted.
        self.path = path
        self.options = tuple(options)
        self.mounted = False
        #: The directories created for a given upper (it and its missing parents), which
        #: discarding the changes removes again.
        self.made_for_upper: tuple[Path, ...] = ()
        #: What the upper was before this view used it (set by :func:`overlay`): unless it was
        #: new, empty or a clean cowfs upper, it holds more than this view's changes, and
        #: :meth:`discard` keeps them unless told ``all_changes=True``. A View made by hand
        #: knows nothing of its upper: USED.
        self.upper_origin = UpperOrigin.USED

    @property
    def base(self) -> Path:
        """The topmost lower directory (the one :meth:`commit` writes to by default)."""
        return self.lowers[0]

    def __repr__(self) -> str:
        state = "mounted" if self.mounted else "unmounted"
        return f"<cowfs.View {str(self.path)!r} over {str(self.base)!r} ({state})>"

    def mount(self) -> None:
        if not self.mounted:
            mount(self.lowers, self.upper, self.path, self.options)
            self.mounted = True

    def unmount(self) -> None:
        if self.mounted:
            unmount(self.path)
            self.mounted = False

    def diff(self) -> list[Change]:
        """What changed against the lowers: Added, Modified, Deleted, Replaced and Renamed
        records of :mod:`cowfs.tools.walk` (unchanged copies and anomalies left out)."""
        if self.mounted:
            layers = mounts.layers_for(str(self.path), None)
            return list(visible_changes(walk(layers.upper, layers.lowers, layers.work)))
        return list(visible_changes(walk(self.upper, self.lowers)))

    def summary(self) -> str:
        """``2 added, 1 modified`` (or ``no changes``)."""
        return summary(self.diff())  # type: ignore[arg-type]

    def commit(self, into: PathLike | None = None) -> str:
        """Apply the changes to ``into`` (default: the base), empty the upper, and mount again.
        Returns the summary of what was committed."""
        target = Path(into) if into is not None else self.base
        if len(self.lowers) > 1 and target == self.base:
            raise CowfsError("commit into a stack of several lowers is not supported; "
                             "give into= a single directory")
        was_mounted = self.mounted
        self.unmount()
        try:
            committed = commit(self.upper, target, yes=True, dry_run=False, out=io.StringIO())
            if self.upper_origin is UpperOrigin.USED:
                self.upper_origin = UpperOrigin.CLEAN  # emptied: what is in it now is ours
            return committed
        finally:
            if was_mounted:
                self.mount()

    def discard(self, *, all_changes: bool = False) -> None:
        """Throw the view's changes away (the view shows the lowers again).

        Only an upper that held nothing before this view (a temporary one, or a given one that
        was new, empty or a clean cowfs upper) is emptied: a given upper that already held
        changes or files keeps them, and this raises :class:`CowfsError`, unless
        ``all_changes=True`` asks to throw away everything in it (as ``cowfs reset UPPER``).
        """
        if self.upper_origin is UpperOrigin.USED and not all_changes:
            raise CowfsError(f"not discarding: the upper {str(self.upper)!r} held changes or "
                             "files before this view, which discarding would delete too; pass "
                             "all_changes=True to throw all of them away")
        was_mounted = self.mounted
        self.unmount()
        try:
            empty_upper(self.upper)
        finally:
            if was_mounted:
                self.mount()


@contextlib.contextmanager
def overlay(base: PathLike | Sequence[PathLike], upper: PathLike | None = None, *,
            at: PathLike | None = None, keep: bool | None = None,
            options: Sequence[str] = ()) -> Iterator[View]:
    """Mount a writable copy-on-write view of ``base`` and yield it; unmount on exit.

    ``base`` is a directory, or several (topmost first). ``upper`` receives the changes; without
    it a temporary directory does, deleted on exit unless ``keep`` is true. ``at`` is where the
    view is mounted (default: a temporary directory; it may be ``base`` itself, which then shows
    the view to every process). ``options`` are ``cowfs mount -o`` options.
    """
    lowers = _lower_list(base)
    for lower in lowers:
        if not lower.is_dir():
            raise CowfsError(f"lower directory {str(lower)!r} does not exist"
                             if not lower.exists() else f"lower {str(lower)!r} is not a "
                             "directory")
    # Every refusal comes before anything is created.
    for role, given in (("upper", upper), ("mountpoint", at)):
        if given is not None and os.path.lexists(given) and not Path(given).is_dir():
            raise CowfsError(f"{role} {str(given)!r} is not a directory")
    if at is not None:
        mounts.refuse_root_mountpoint(Path(at))
    if upper is not None:
        check_nesting(LayerPaths(lowers, Path(upper)))
    temporary_upper = upper is None
    keep = (not temporary_upper) if keep is None else keep
    origin = upper_origin(Path(upper)) if upper is not None else UpperOrigin.NEW
    if not keep and upper is not None:
        refuse_to_discard(Path(upper), origin)
    scratch = Path(tempfile.mkdtemp(prefix="cowfs-view-"))
    made_upper: list[Path] = []  # directories created here, removed again on failure
    made_at: list[Path] = []
    try:
        upper_dir = Path(upper) if upper is not None else scratch / "upper"
        made_upper = outputs.make_dirs(upper_dir)
        match_root(upper_dir, lowers[0])
        if at is None:
            mountpoint = scratch / "view"
            mountpoint.mkdir()
        else:
            mountpoint = Path(at)
            made_at = outputs.make_dirs(mountpoint)
        view = View(lowers, upper_dir.resolve(), mountpoint.resolve(), options)
        view.made_for_upper = tuple(made_upper) if upper is not None else ()
        view.upper_origin = origin
        view.mount()
    except BaseException:
        if upper is not None and origin is not UpperOrigin.USED:
            with contextlib.suppress(CowfsError, OSError):
                discard_upper(Path(upper), origin)
        outputs.remove_dirs(made_upper + made_at)
        _remove_scratch(scratch)
        raise
    try:
        yield view
    finally:
        try:
            view.unmount()
            if not keep:
                discard_upper(upper_dir, origin)
                outputs.remove_dirs(made_upper)
        finally:
            outputs.remove_dirs(made_at)  # still mounted (the unmount failed): left alone
            if view.mounted:
                pass  # the unmount failed: the daemon still serves from the upper; all stays
            elif temporary_upper and keep:
                # Keep the upper, drop the rest of the scratch directory.
                with contextlib.suppress(OSError):
                    (scratch / "view").rmdir()
            else:
                _remove_scratch(scratch)


def _remove_scratch(scratch: Path) -> None:
    """Delete the scratch directory, unless something is still mounted inside it (rmtree would
    then delete through the mount)."""
    inside = [m for m in mounts.cowfs_mountpoints() if mounts.is_inside(Path(m), scratch)]
    if inside:
        raise CowfsError(f"{inside[0]!r} is still mounted; not removing {str(scratch)!r}")
    plans.remove_path(scratch)

