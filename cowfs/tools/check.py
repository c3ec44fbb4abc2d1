"""``cowfs check UPPER [--lower L] [--repair]``: validate a layer, and repair what can be repaired.

What is checked (the walk's :class:`~cowfs.tools.walk.Anomaly` records, plus the work directory):

==========================  ===========================================  =========================
finding                     why it matters                               repair
==========================  ===========================================  =========================
unknown format version      written by another cowfs; nothing else is    none: refused
                            checked
leftover in WORK/tmp        a copy-up or removal cut short by a crash    delete it
whiteout, parent unmarked   shows as an empty file, hides nothing        mark the parent
                                                                         ``opaque=x``
whiteout in opaque dir      shows as an empty file                       delete it
whiteout over nothing       clutter (needs ``--lower``)                  delete it
bad or missing redirect     the directory's lower content cannot be      drop the redirect, make
                            found (or would be outside the layer)        the directory opaque
redirect on a non-dir       meaningless                                  drop the redirect
metacopy without data       its data (the lower file its origin names)   none
                            is missing or may not be used: reads fail
bad origin or name count    malformed, out of range, or (with            drop the xattr
                            ``--lower``) an origin that does not name
                            the lower object it was copied from: the
                            mount ignores it (cowfs.tools.identity)
==========================  ===========================================  =========================

Repairs keep what the mount shows wherever the mount showed something well-defined. They need the
upper unmounted (the work-directory lock is held while repairing) and ``--yes``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..core import mounts, realfs, schema, upperinfo
from ..core.errors import CowfsError
from ..core.wording import counted
from . import identity, plans
from .changes import quote
from .walk import Anomaly, Problem, walk

_NEEDS_LOWERS = (Problem.STRAY_WHITEOUT, Problem.MISSING_REDIRECT, Problem.METACOPY_NO_DATA)


@dataclass(frozen=True, slots=True)
class Finding:
    path: str
    what: str
    repair: str | None  # what --repair does, or None when it cannot
    #: An ignored origin or name count (repaired by removing it), see cowfs.tools.identity.
    bad_value: identity.BadValue | None = None


def _format_finding(upper: Path) -> Finding | None:
    try:
        upperinfo.upper_format_at(upper)
    except CowfsError as e:
        return Finding(".", str(e), None)
    return None


def _work_findings(upper: Path) -> list[Finding]:
    work = mounts.work_of(upper)
    if not os.path.lexists(work):
        return []
    if work.is_symlink() or not work.is_dir():
        return [Finding(schema.WORK_DIR_NAME, "the work directory is not a directory", None)]
    tmp = work / schema.WORK_TMP_NAME
    if not tmp.is_dir() or tmp.is_symlink():
        return []
    return [Finding(f"{schema.WORK_DIR_NAME}/{schema.WORK_TMP_NAME}/{name}",
                    "leftover from an interrupted operation", "delete it")
            for name in sorted(os.listdir(tmp))]


_REPAIRS: dict[Problem, str | None] = {
    Problem.STRAY_WHITEOUT: "delete it",
    Problem.UNMARKED_WHITEOUT: "mark the parent directory overlay.opaque=x",
    Problem.WHITEOUT_IN_OPAQUE: "delete it",
    Problem.BAD_REDIRECT: "drop the redirect and make the directory opaque",
    Problem.MISSING_REDIRECT: "drop the redirect and make the directory opaque",
    Problem.METACOPY_NO_DATA: None,  # the data is gone: nothing to show instead
}


def findings(upper: Path, lowers: Sequence[Path] | None) -> tuple[list[Finding], list[Anomaly]]:
    """What is wrong with ``upper``; with ``lowers`` None, checks that need them are skipped."""
    if not upper.is_dir():
        raise CowfsError(f"upper directory {str(upper)!r} does not exist"
                         if not upper.exists() else f"upper {str(upper)!r} is not a directory")
    bad_format = _format_finding(upper)
    if bad_format is not None:
        return [bad_format], []
    into = upperinfo.committing_into(upper)
    if into is not None:  # the walk would compare the upper with a half-committed base
        return [Finding(".", f"an interrupted commit into {into!r} is unfinished; finish it: "
                        f"cowfs commit {upper} --into {into} --yes", None)], []
    found = _work_findings(upper)
    anomalies = [r for r in walk(upper, lowers or []) if isinstance(r, Anomaly)
                 and (lowers is not None or r.problem not in _NEEDS_LOWERS)]
    for a in anomalies:
        detail = f" ({a.detail})" if a.detail else ""
        found.append(Finding(a.path, a.problem.value + detail, _REPAIRS[a.problem]))
    for bad in identity.problems(upper, lowers):
        found.append(Finding(bad.path, f"{bad.xattr} ignored: {bad.reason}",
                             f"remove {bad.xattr}", bad))
    return found, anomalies


def _set_xattr_at(root_fd: int, path: str, name: str, value: bytes) -> None:
    if path == ".":
        realfs.setxattr(root_fd, name, value)
        return
    with plans.parent_of(root_fd, path) as (dirfd, leaf):
        fd = os.open(leaf, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            realfs.setxattr(fd, name, value)
        finally:
            os.close(fd)


def _drop_redirect(root_fd: int, path: str) -> None:
    """An unusable redirect: the directory keeps only its upper content (opaque), as the mount
    cannot show any lower content for it either."""
    with plans.parent_of(root_fd, path) as (dirfd, leaf):
        fd = os.open(leaf, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            realfs.setxattr(fd, schema.XATTR_OPAQUE, schema.OPAQUE_YES)
            with contextlib.suppress(OSError):
                realfs.removexattr(fd, schema.XATTR_REDIRECT)
        finally:
            os.close(fd)


def _repair(upper: Path, finding_list: list[Finding], anomalies: list[Anomaly]) -> None:
    root = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for f in finding_list:
            if f.bad_value is not None:
                identity.drop(upper, f.bad_value)
            elif f.path.startswith(schema.WORK_DIR_NAME + "/"):
                with plans.parent_of(root, f.path) as (dirfd, leaf):
                    plans.remove_if_present(dirfd, leaf)
        for a in anomalies:
            match a.problem:
                case Problem.STRAY_WHITEOUT | Problem.WHITEOUT_IN_OPAQUE:
                    with plans.parent_of(root, a.path) as (dirfd, leaf):
                        plans.remove_if_present(dirfd, leaf)
                case Problem.UNMARKED_WHITEOUT:
                    _set_xattr_at(root, a.path.rpartition("/")[0] or ".", schema.XATTR_OPAQUE,
                                  schema.OPAQUE_HAS_XWHITEOUTS)
                case Problem.BAD_REDIRECT | Problem.MISSING_REDIRECT:
                    _drop_redirect(root, a.path)
    finally:
        os.close(root)


def check(upper: Path, lowers: Sequence[Path] | None, *, repair: bool, yes: bool,
          dry_run: bool, out: TextIO | None = None) -> int:
    """Print the findings; repair them if asked. Returns the exit status (0: layer is fine)."""
    out = out or sys.stdout
    with mounts.exclusive_upper(upper, "repair") if repair else contextlib.nullcontext():
        if repair:
            upperinfo.refuse_if_committing(upper, "repair")
        found, anomalies = findings(upper, lowers)
        if lowers is None:
            print("note: without --lower, whiteouts over nothing and redirect targets are not "
                  "checked", file=out)
        if not found:
            print(f"{upper}: no problems found", file=out)
            return 0
        lines = [f"{quote(f.path)}: {f.what}" + (f"  [repair: {f.repair}]" if f.repair else
                                                 "  [cannot be repaired]") for f in found]
        if not repair:
            for line in lines:
                print(line, file=out)
            print(f"{counted(len(found), 'problem')} found; 'cowfs check --repair' repairs "
                  f"{sum(f.repair is not None for f in found)} of them", file=out)
            return 1
        fixable = [f for f in found if f.repair is not None]
        if not fixable:
            for line in lines:
                print(line, file=out)
            raise CowfsError(f"{counted(len(found), 'problem')} found, none can be repaired")
        if not plans.confirm(lines, yes=yes, dry_run=dry_run, out=out,
                              question="Repair these problems?"):
            return 1
        _repair(upper, fixable, anomalies)
        left = len(found) - len(fixable)
        print(f"repaired {counted(len(fixable), 'problem')}" + (f"; {left} left" if left else ""),
              file=out)
        return 1 if left else 0
