"""``cowfs run [--upper DIR] [--keep|--discard] [--at PATH] BASE -- COMMAND...``: a disposable
writable view.

BASE is mounted (over itself, or at ``--at PATH``) with a fresh upper, COMMAND runs with its
working directory in the view (the same place inside it when the caller's working directory is
inside BASE), and the view is unmounted when COMMAND ends, whether it succeeded, failed, crashed
or was interrupted. A summary of what changed goes to stderr (the counts by kind and the first
:data:`SUMMARY_LINES` changes; ``--diff-out FILE`` writes all of them, ``--exclude`` leaves some
out of both); stdout belongs to COMMAND. The changes are then discarded (the default with a
temporary upper) or kept (the default with ``--upper``), also when the summary is interrupted.
The exit status is COMMAND's (128+N when a signal N ended it; 127 when it was not found).

While COMMAND runs, Ctrl-C reaches it directly (it is in the terminal's foreground process group)
and ``cowfs run`` ignores it, as a shell does; SIGTERM and SIGHUP sent to ``cowfs run`` are passed
on to COMMAND.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from ..core import mounts, upperinfo
from ..core.errors import CowfsError
from ..core.layers import LayerPaths, check_nesting
from . import outputs, plans
from . import private as _private
from . import stack as _stack
from .api import View, overlay
from .changes import Visible, line, render_json, render_text, select, summary, visible_changes
from .walk import walk
from .workspace import UpperOrigin, discard_upper, refuse_to_discard, upper_origin

#: How many changes the summary lists one by one before it only counts them.
SUMMARY_LINES = 20


def run_command(command: Sequence[str], cwd: Path) -> int:
    try:
        # Spawned before SIGINT is ignored here, so COMMAND gets the default disposition.
        proc = subprocess.Popen(list(command), cwd=cwd)
    except FileNotFoundError:
        raise CowfsError(f"command not found: {command[0]}", 127) from None
    except PermissionError:
        raise CowfsError(f"command not executable: {command[0]}", 126) from None
    with _private.signals_to(proc.pid):
        status = proc.wait()
    return status if status >= 0 else 128 - status


def _working_dir(base: Path, mountpoint: Path) -> Path:
    """The caller's working directory, seen in the view when it is inside BASE."""
    try:
        here = Path.cwd()
    except FileNotFoundError:
        return mountpoint
    if here == base or base in here.parents:
        return mountpoint / here.relative_to(base)
    return mountpoint


def _check_diff_out(diff_out: Path, real_base: Path) -> Path:
    """``--diff-out FILE``, checked before anything is mounted: the list must not be lost after
    the command ran, nor written into BASE, which cowfs run never changes."""
    target = Path(os.path.abspath(diff_out))
    if not target.parent.is_dir():
        raise CowfsError(f"--diff-out: directory {str(target.parent)!r} does not exist")
    if target.is_dir():
        raise CowfsError(f"--diff-out: {str(diff_out)!r} is a directory; give a file name")
    real = target.parent.resolve() / target.name
    if real == real_base or real_base in real.parents:
        raise CowfsError(f"--diff-out: {str(diff_out)!r} is inside the base {str(real_base)!r}, "
                         "which cowfs run does not change; write it elsewhere")
    return real


def _report(changes: list[Visible], err: TextIO, diff_out: Path | None,
            diff_json: bool | None) -> None:
    for change in changes[:SUMMARY_LINES]:
        print(f"  {line(change)}", file=err)
    if len(changes) > SUMMARY_LINES:
        print(f"  ... and {len(changes) - SUMMARY_LINES} more"
              + ("" if diff_out else " (all of them: --diff-out FILE)"), file=err)
    if diff_out is not None:
        as_json = diff_json if diff_json is not None else diff_out.suffix == ".json"
        diff_out.write_text(render_json(changes) if as_json else render_text(changes))
        what = "the one change" if len(changes) == 1 else f"all {len(changes)} changes"
        print(f"cowfs run: the list of {what} is in {diff_out}", file=err)


def run(base: Path | str, command: Sequence[str], *, upper: Path | None, keep: bool | None,
        at: Path | None, err: TextIO | None = None, diff_out: Path | None = None,
        diff_json: bool | None = None, excludes: Sequence[str] = (),
        private: bool = True) -> int:
    """``private``: the view in a mount namespace of the job's own (for a plain user inside a
    user namespace; see :mod:`cowfs.tools.private`), else in the machine's, where every process
    sees it."""
    err = err or sys.stderr
    if not command:
        raise CowfsError("no command given: cowfs run BASE -- COMMAND...")
    if _stack.is_stack(base):
        return _run_stack(_stack.load(base), command, upper=upper, keep=keep, at=at, err=err,
                          diff_out=diff_out, diff_json=diff_json, excludes=excludes,
                          private=private)
    lowers = _lowers(str(base))
    for lower in lowers:
        if not lower.is_dir():
            what = "base directory" if len(lowers) == 1 else "lower directory"
            raise CowfsError(f"{what} {str(lower)!r} does not exist" if not lower.exists()
                             else f"base {str(lower)!r} is not a directory")
    lowers = tuple(lower.resolve() for lower in lowers)
    real_base = lowers[0]
    if diff_out is not None:
        diff_out = _check_diff_out(diff_out, real_base)
    keep_changes = (upper is not None) if keep is None else keep
    mountpoint = at if at is not None else real_base
    mounts.refuse_root_mountpoint(mountpoint)
    if upper is not None and upper.exists() and not upper.is_dir():
        raise CowfsError(f"upper {str(upper)!r} is not a directory; give a new or empty "
                         "directory")
    origin = upper_origin(upper) if upper is not None else UpperOrigin.NEW
    if upper is not None and origin is UpperOrigin.USED and not upperinfo.upper_format_at(upper):
        raise CowfsError(f"upper {str(upper)!r} is neither empty nor a cowfs upper directory; "
                         "give a new or empty directory")
    if not keep_changes and upper is not None:
        refuse_to_discard(upper, origin)
    if upper is not None:
        # Before anything is made (a private view makes its upper here, before the child's mount
        # would refuse it): an upper inside a lower would change the lower.
        check_nesting(LayerPaths(lowers, Path(os.path.abspath(upper))))
    if private and not _private.available():
        print("cowfs run: this system lets only root make a private view (no user "
              "namespaces for plain users); the view is shared: other processes see it while "
              "COMMAND runs", file=err)
        private = False
    status = 0
    started: list[View] = []
    try:
        if private:
            view = _private_view(lowers, upper, mountpoint)
            started.append(view)

            def job() -> int:
                with (overlay(lowers, view.upper, at=mountpoint, keep=True) as mounted,
                      _private.without_ambient()):
                    return _run_in(mounted, real_base, command)

            status = _private.run(job, mountpoint)
        else:
            with overlay(lowers, upper, at=mountpoint, keep=True) as view:
                started.append(view)
                status = _run_in(view, real_base, command)
    except BaseException:
        # COMMAND not found or not executable, or the view could not be unmounted: a temporary
        # upper goes unless it holds changes that were to be kept.
        if started and upper is None and not started[0].mounted and not (
                keep_changes and visible_changes(walk(started[0].upper, started[0].lowers))):
            plans.remove_path(started[0].upper.parent)
        elif started and private and upper is not None and origin is UpperOrigin.NEW and not (
                any(started[0].upper.iterdir())):
            started[0].upper.rmdir()  # made for the view, which never wrote to it
            outputs.remove_dirs(started[0].made_for_upper)
        raise
    if status > 128 and status - 128 in signal.valid_signals():
        # Ctrl-C reached COMMAND (the "^C" echoed mid-line at a terminal): say so first.
        start = "\n" if err.isatty() else ""
        print(f"{start}cowfs run: {command[0]} ended by {signal.Signals(status - 128).name}; "
              "the view was unmounted", file=err)
    discarded = False
    try:
        everything = visible_changes(walk(view.upper, view.lowers))
        changes = select(everything, (), excludes)
        _report(changes, err, diff_out, diff_json)
        left_out = len(everything) - len(changes)
        what = summary(changes) + (f" ({left_out} more excluded)" if left_out else "")
        if not keep_changes:
            _discard(view, upper, origin)
            discarded = True
            print(f"cowfs run: {what}; discarded", file=err)
        else:
            print(f"cowfs run: {what}; kept in {view.upper}", file=err)
    finally:
        # Ctrl-C or a failure while summarising still discards what was to be discarded.
        if not keep_changes and not discarded:
            _discard(view, upper, origin)
    return status


def _run_stack(stack: _stack.Stack, command: Sequence[str], *, upper: Path | None,
               keep: bool | None, at: Path | None, err: TextIO, diff_out: Path | None,
               diff_json: bool | None, excludes: Sequence[str], private: bool) -> int:
    """``cowfs run STACK``: the stack's layers as the lowers, its live upper as the upper (the
    changes kept there, for ``cowfs layer freeze``), and the view at a temporary directory
    unless ``--at`` (a stack has no directory of its own to mount over). With ``--discard``,
    the live upper is the topmost lower of a temporary upper instead: the job sees the stack as
    it is, and leaves it so. The command starts at the view's root."""
    if upper is not None:
        raise CowfsError("--upper: a stack's changes go to its own upper "
                         f"({str(stack.upper)!r}); give the stack's layers instead "
                         f"('cowfs layer list --lowers {stack.root}') to use another upper")
    scratch = None
    if at is None:
        scratch = Path(tempfile.mkdtemp(prefix="cowfs-stack-view-"))
        at = scratch / "view"
    try:
        if keep is False:
            return run(f"{stack.upper}:{stack.lowers_spec()}", command, upper=None, keep=False,
                       at=at, err=err, diff_out=diff_out, diff_json=diff_json,
                       excludes=excludes, private=private)
        return run(stack.lowers_spec(), command, upper=stack.upper, keep=True, at=at, err=err,
                   diff_out=diff_out, diff_json=diff_json, excludes=excludes, private=private)
    finally:
        if scratch is not None:
            with contextlib.suppress(OSError):
                (scratch / "view").rmdir()
            with contextlib.suppress(OSError):
                scratch.rmdir()


def _run_in(view: View, real_base: Path, command: Sequence[str]) -> int:
    """COMMAND in the mounted view, in the caller's place inside it."""
    cwd = _working_dir(real_base, view.path)
    return run_command(command, cwd if cwd.is_dir() else view.path)


def _private_view(lowers: tuple[Path, ...], upper: Path | None, mountpoint: Path) -> View:
    """What the parent of a private view knows of it: the layers and where the job saw it. The
    upper is made here (a temporary one, or a given one that is missing, with its parents), so
    that the summary finds it, and discarding removes what was made, after the child is gone."""
    if upper is None:
        made_upper = Path(tempfile.mkdtemp(prefix="cowfs-run-")) / "upper"
        made_upper.mkdir()
        return View(lowers, made_upper.resolve(), Path(os.path.abspath(mountpoint)))
    made = outputs.make_dirs(upper)
    view = View(lowers, upper.resolve(), Path(os.path.abspath(mountpoint)))
    view.made_for_upper = tuple(made)
    return view


def _lowers(base: str) -> tuple[Path, ...]:
    """BASE, or a stack ``L1:L2`` (topmost first) as ``cowfs mount`` takes it; a directory whose
    name holds ``:`` is itself."""
    if os.path.isdir(base) or ":" not in base:
        return (Path(base),)
    return tuple(Path(p) for p in base.split(":"))


def _discard(view: View, upper: Path | None, origin: UpperOrigin) -> None:
    if upper is None:
        plans.remove_path(view.upper.parent)
    else:
        discard_upper(view.upper, origin)
        outputs.remove_dirs(view.made_for_upper)
