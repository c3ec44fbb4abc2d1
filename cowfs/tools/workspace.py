"""``cowfs commit UPPER --into BASE`` and ``cowfs reset UPPER [PATH...]``.

Commit turns the walk's records into a plan of steps on BASE, writes it as a journal and applies
it, then empties the upper (:mod:`cowfs.tools.journal`). Each non-directory is built next to its
final name (data, xattrs, owner, mode, times, fsync) and renamed over it, so a reader of BASE sees
either the old or the new file, never a partial one. Renamed directories are first moved, deepest
source first, into the journal's staging directory inside BASE and from there to their new names, so
that renames of a directory and of something inside it do not depend on each other's order.
Directory attributes are set last, deepest first, so that the changes below them do not disturb
their times. While it runs, the upper's lock is held, so it cannot be mounted.

Both commands check their targets first: UPPER must be a cowfs upper (the format marker), not
mounted and not a mountpoint; BASE must not be a cowfs upper (swapped arguments), nor under or
below a live mount, and it must be the stack recorded on UPPER (unless ``--relocate``).

Known limits: the commit as a whole is not atomic: until it is finished (by itself, or by running
the same command again after an interruption or a failed step), BASE is half-committed. Only a
single lower (BASE) is supported.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import TextIO

from ..core import metacopy, mounts, partial, realfs, schema, upperinfo
from ..core.dirstack import PathDirs
from ..core.errors import CowfsError
from ..core.wording import counted
from . import journal, plans
from .changes import Visible, quote, summary, visible_changes
from .journal import Op, Step
from .walk import (
    Added,
    Anomaly,
    Change,
    Deleted,
    Kind,
    Modified,
    Problem,
    Renamed,
    Replaced,
    Stack,
    Unchanged,
    redirect_source,
    walk,
)


def plan_commit(records: Sequence[Change]) -> list[Step]:
    """The steps that make BASE show what the overlay showed."""
    steps: list[Step] = []
    renames = [r for r in records if isinstance(r, Renamed)]
    slots = {r.path: str(i) for i, r in enumerate(renames)}
    for r in sorted(renames, key=lambda r: -r.source.count("/")):
        steps.append(Step(Op.STAGE, r.source, slots[r.path]))
    dirs: list[str] = []
    sources = {r.source for r in renames}  # moved away by their STAGE step already
    for record in records:
        if isinstance(record, Deleted) and record.path in sources:
            continue
        match record:
            case Added(path=path, kind=Kind.DIR) | Replaced(path=path, kind=Kind.DIR):
                if isinstance(record, Replaced):
                    steps.append(Step(Op.REMOVE, path))
                steps.append(Step(Op.MKDIR, path))
                dirs.append(path)
            case Replaced(path=path):
                steps.append(Step(Op.REMOVE, path))
                steps.append(Step(Op.WRITE, path))
            case (Added(path=path, hardlink_of=str(first))
                  | Modified(path=path, hardlink_of=str(first))
                  | Unchanged(path=path, hardlink_of=str(first))):
                steps.append(Step(Op.LINK, path, first))
            case Added(path=path):
                steps.append(Step(Op.WRITE, path))
            case Modified(path=path, data=True, via_index=index):
                steps.append(Step(Op.WRITE, path, index=index))
            case Modified(path=path, kind=Kind.DIR):
                dirs.append(path)
            case Modified(path=path, via_index=index):
                steps.append(Step(Op.ATTRS, path, index=index))
            case Deleted(path=path):
                steps.append(Step(Op.REMOVE, path))
            case Renamed(path=path, source=source):
                steps.append(Step(Op.MOVE, path, slots[path], source))
                dirs.append(path)
    steps += [Step(Op.ATTRS, path) for path in reversed(dirs)]
    return steps


# --- emptying an upper ---------------------------------------------------------------------------

def empty_upper(upper: Path, work: Path | None = None) -> None:
    """Remove every change from ``upper``, keeping its format marker, its recorded stack and its
    work directory (``work``: default, the one recorded on the upper at its last mount, checked
    to be this upper's before anything is removed: :func:`cowfs.core.upperinfo.open_work_dir`).

    The work directory's scratch area and index are emptied too: the index names copies in the
    upper, and there are none left.
    """
    work_fd = upperinfo.open_work_dir(upper, work if work is not None
                                      else upperinfo.recorded_work(upper))
    try:
        fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in realfs.list_names(fd):
                if name != schema.WORK_DIR_NAME:
                    realfs.remove_tree(fd, name)
            with contextlib.suppress(OSError):
                realfs.removexattr(fd, schema.XATTR_OPAQUE)
        finally:
            os.close(fd)
        if work_fd is not None:
            _clear_work(work_fd)
    finally:
        if work_fd is not None:
            os.close(work_fd)


def _clear_work(fd: int) -> None:
    """Empty ``WORK/tmp`` and remove ``WORK/index`` of the work directory open at ``fd``;
    nothing else in a work directory is cowfs's."""
    plans.remove_if_present(fd, schema.WORK_INDEX_NAME)
    tmp = realfs.open_path(fd, schema.WORK_TMP_NAME)
    if tmp is not None:
        try:
            if stat.S_ISDIR(os.fstat(tmp).st_mode):
                for name in realfs.list_names(tmp):
                    realfs.remove_tree(tmp, name)
        finally:
            os.close(tmp)


class UpperOrigin(Enum):
    """What a directory given as the upper of a disposable view was before cowfs used it: what
    discarding the view's changes may remove afterwards."""

    NEW = "new"  # did not exist: removed whole
    EMPTY = "empty"  # an empty directory: emptied again (work directory and markers too)
    CLEAN = "clean"  # a cowfs upper without changes: emptied again
    USED = "used"  # holds something else: nothing may be discarded


def upper_origin(path: Path) -> UpperOrigin:
    if not os.path.lexists(path):
        return UpperOrigin.NEW
    if not path.is_dir() or path.is_symlink():
        return UpperOrigin.USED
    names = os.listdir(path)
    if not names:
        return UpperOrigin.EMPTY
    if names == [schema.WORK_DIR_NAME] and upperinfo.upper_format_at(path):
        return UpperOrigin.CLEAN
    return UpperOrigin.USED


def refuse_to_discard(path: Path, origin: UpperOrigin) -> None:
    if origin is UpperOrigin.USED:
        raise CowfsError(f"{str(path)!r} already holds files (or earlier changes), which "
                         "discarding the changes would delete; give a new or empty directory "
                         "as the upper, or keep the changes")


def discard_upper(path: Path, origin: UpperOrigin) -> None:
    """Throw a disposable view's changes away, leaving ``path`` as it was before (see
    :class:`UpperOrigin`)."""
    refuse_to_discard(path, origin)
    if origin is UpperOrigin.NEW:
        parent = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            plans.remove_if_present(parent, path.name)
        finally:
            os.close(parent)
        return
    empty_upper(path)
    if origin is UpperOrigin.EMPTY:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            plans.remove_if_present(fd, schema.WORK_DIR_NAME)
            for name in (schema.XATTR_FORMAT, schema.XATTR_STACK):
                with contextlib.suppress(OSError):
                    realfs.removexattr(fd, name)
        finally:
            os.close(fd)


# --- the commands --------------------------------------------------------------------------------


def _check_base(base: Path, upper: Path) -> None:
    if not base.exists():
        raise CowfsError(f"base directory {str(base)!r} does not exist")
    if not base.is_dir():
        raise CowfsError(f"base {str(base)!r} is not a directory")
    real_base, real_upper = base.resolve(), upper.resolve()
    if real_base == real_upper or real_base in real_upper.parents \
            or real_upper in real_base.parents:
        raise CowfsError("the upper and the base must not contain each other")
    if upperinfo.upper_format_at(real_base):
        raise CowfsError(f"cannot commit into {str(base)!r}: it is a cowfs upper directory, not "
                         "a base (are the arguments swapped? 'cowfs commit UPPER --into BASE')")
    # The mount table of this mount namespace decides what covers BASE (a mount recorded in
    # another state directory, or none, counts as well); the state files name the lowers.
    for mountpoint in mounts.cowfs_mountpoints():
        if mounts.is_inside(real_base, Path(mountpoint)):
            raise CowfsError(f"cannot commit: {str(base)!r} is under the cowfs mount at "
                             f"{mountpoint!r}; unmount it first")
    for mount in mounts.running_mounts():
        if not mount.alive:
            continue
        if any(real_base == p or p in real_base.parents for p in mount.lowers):
            raise CowfsError(f"cannot commit: {str(base)!r} is a lower layer of the cowfs mount "
                             f"at {str(mount.mountpoint)!r}; unmount it first")


def _pending(upper: Path, base: Path) -> journal.Found | None:
    """The journal of an unfinished commit of ``upper`` into ``base`` (to resume), or None;
    refuses when either is in the middle of another commit.

    Whoever can write BASE can put a journal there, and whoever can write the upper can mark
    it: a journal is resumed only when it is the committing user's own (:func:`journal.load`),
    names this upper, and is the very plan whose digest this upper's mark recorded for this
    base before the plan was written."""
    real_upper, real_base = upper.resolve(), base.resolve()
    mark = upperinfo.commit_mark(real_upper)
    found = journal.load(real_base)
    if found is not None and found.journal.upper != str(real_upper):
        raise CowfsError(f"an interrupted commit of {found.journal.upper!r} into {str(base)!r} "
                         f"is unfinished; finish it first: cowfs commit {found.journal.upper} "
                         f"--into {found.journal.base} --yes")
    if mark is not None and mark.base != str(real_base):
        raise CowfsError(f"an interrupted commit of {str(upper)!r} into {mark.base!r} is "
                         f"unfinished; finish it first: cowfs commit {upper} --into {mark.base} "
                         "--yes")
    if found is not None and (mark is None or mark.plan != found.digest
                              or found.journal.base != str(real_base)):
        why = f"no {schema.XATTR_COMMITTING} mark" if mark is None else "another plan"
        raise CowfsError(f"{str(real_base / journal.JOURNAL_DIR)!r} holds a commit journal of "
                         f"{str(upper)!r} that this upper does not record as its interrupted "
                         f"commit ({why}); "
                         "refusing to resume it: if no commit of it was interrupted, remove that "
                         "directory")
    return found


def _copied_whole(records: Sequence[Change]) -> list[str]:
    """Paths of the files a commit copies from the upper (its ``WRITE`` steps of the upper)."""
    paths = []
    for record in records:
        match record:
            case Added(kind=Kind.FILE, hardlink_of=None) | Replaced(kind=Kind.FILE) | Modified(
                    kind=Kind.FILE, data=True, hardlink_of=None, via_index=None):
                paths.append(record.path)
    return paths


def fill_metacopies(upper: Path, base: Path, paths: Sequence[str]) -> None:
    """Give the metacopy files among ``paths`` their data in the upper (as the mount does at the
    first write; the merged view does not change): the commit copies them whole, and their data
    is in BASE, which the commit is about to change."""
    stack = Stack(upper, [base])
    dirs = PathDirs(stack.roots[0].fd)
    try:
        for path in paths:
            with dirs.parent_of(path) as (dirfd, name):
                fd = realfs.open_path(dirfd, name)
                if fd is None:
                    continue
                try:
                    if not (stat.S_ISREG(os.fstat(fd).st_mode) and metacopy.is_marked(fd)):
                        continue
                    data = metacopy.find_data(fd, stack.roots,
                                              os.fstat(stack.roots[0].fd).st_uid)
                    try:
                        dmap = partial.read_map(fd)
                        if dmap is not None:  # its blocks are here: copy in the rest
                            opened = partial.PartialFile(fd, data.fd, dmap)
                            try:
                                opened.complete()
                            finally:
                                opened.close()
                        else:
                            metacopy.fill(fd, data.fd, with_data=True, sync=True, reflink=True)
                    finally:
                        os.close(data.fd)
                finally:
                    os.close(fd)
    finally:
        dirs.close()
        stack.close()


def _fresh_plan(upper: Path, base: Path, work: Path | None,
                relocate: bool) -> tuple[list[journal.Step], list[Visible], list[str]]:
    upperinfo.verify_stack(upper, upperinfo.identities([base.resolve()]), relocate=relocate,
                           what="commit", override="--relocate to commit all the same",
                           required=True)
    if relocate:  # metacopy and partial files find their data by path again (metacopy.rebind)
        stack = Stack(upper, [base])
        try:
            metacopy.rebind(stack.roots[0].fd, stack.roots, os.fstat(stack.roots[0].fd).st_uid)
        finally:
            stack.close()
    records = list(walk(upper, [base], work))
    problems = [r for r in records
                if isinstance(r, Anomaly) and r.problem is not Problem.STRAY_WHITEOUT]
    if problems:
        raise CowfsError(f"{str(upper)!r} has {counted(len(problems), 'problem')}, e.g. "
                         f"{quote(problems[0].path)}: {problems[0].problem.value}; "
                         f"run 'cowfs check {upper}' first")
    return plan_commit(records), visible_changes(records), _copied_whole(records)


def commit(upper: Path, base: Path, *, yes: bool, dry_run: bool, out: TextIO | None = None,
           work: Path | None = None, relocate: bool = False, verbose: bool = False) -> str:
    """Apply ``upper``'s changes to ``base``, then empty it; or finish the commit that an
    interruption cut short. Returns the summary line. ``work``: the upper's work directory
    (default: the one recorded at its last mount, else the default); it must be this upper's
    (:func:`cowfs.core.upperinfo.open_work_dir`), whatever a record or a journal says."""
    with mounts.exclusive_upper(upper, "commit"):
        upperinfo.require_upper(upper, "commit")
        _check_base(base, upper)
        work = work if work is not None else upperinfo.recorded_work(upper)
        work_fd = upperinfo.open_work_dir(upper, work)
        try:
            return _commit(upper, base, work, work_fd, yes=yes, dry_run=dry_run, out=out,
                           relocate=relocate, verbose=verbose)
        finally:
            if work_fd is not None:
                os.close(work_fd)


def _commit(upper: Path, base: Path, work: Path | None, work_fd: int | None, *, yes: bool,
            dry_run: bool, out: TextIO | None, relocate: bool, verbose: bool) -> str:
    pending = _pending(upper, base)
    if pending is not None:
        plan = pending.journal
        lines = [f"resume the interrupted commit of {str(upper)!r} into {str(base)!r} "
                 f"({pending.done} of {len(plan.steps)} steps done: {plan.summary})"]
        if not plans.confirm(lines, yes=yes, dry_run=dry_run, out=out, question="Finish it?"):
            return plan.summary
        _apply(upper, base, work, work_fd, plan, pending.done)
    else:
        upperinfo.clear_committing(upper)  # set, then interrupted before the journal
        # A --work directory is walked through the descriptor that was checked to be the
        # upper's, not by its path again.
        walked = Path(realfs.proc_path(work_fd)) if work is not None and work_fd is not None \
            else work
        steps, changes, copied = _fresh_plan(upper, base, walked, relocate)
        if not changes:
            print("nothing to commit", file=out)
            return "no changes"
        lines = [line for step in steps if (line := step.describe()) is not None]
        lines.append(f"then empty {str(upper)!r}")
        if not plans.confirm(lines, yes=yes, dry_run=dry_run, out=out, verbose=verbose,
                             summary=_plan_summary(upper, base, work_fd, steps),
                             question=f"Apply these changes to {str(base)!r}?"):
            return summary(changes)
        fill_metacopies(upper, base, copied)
        plan = journal.Journal(str(upper.resolve()), str(base.resolve()), tuple(steps),
                               summary(changes))
        _apply(upper, base, work, work_fd, plan, None)
    print(f"committed into {base}: {plan.summary}", file=out)
    return plan.summary


#: How many of the largest files the summary of a long plan names.
LARGEST_SHOWN = 5


def _plan_summary(upper: Path, base: Path, work_fd: int | None,
                  steps: Sequence[Step]) -> list[str]:
    """A long plan in a few lines: the steps counted by kind, the file data to copy, and the
    largest files."""
    shown = [s for s in steps if s.op is not Op.STAGE]
    kinds: dict[str, int] = {}
    for step in shown:
        name = "attrs" if step.op is Op.ATTRS else step.op.value
        kinds[name] = kinds.get(name, 0) + 1
    applier = journal.Applier(upper, base, work_fd)
    try:
        sizes = [(applier.data_size(step), step.path) for step in shown]
    finally:
        applier.close()
    total = sum(size for size, _ in sizes)
    by_kind = ", ".join(f"{count:,} {name}" for name, count in kinds.items())
    lines = [f"commit {str(upper)!r} into {str(base)!r}: {len(shown):,} steps ({by_kind}); "
             f"{plans.human_bytes(total)} of file data",
             f"then empty {str(upper)!r}"]
    largest = sorted((s for s in sizes if s[0] > 0), reverse=True)[:LARGEST_SHOWN]
    if largest:
        lines.append("largest files:")
        lines += [f"  {plans.human_bytes(size):>10}  {quote(path)}" for size, path in largest]
    return lines


def _apply(upper: Path, base: Path, work: Path | None, work_fd: int | None,
           plan: journal.Journal, done: int | None) -> None:
    """Write the journal (``done`` None: a fresh commit), apply the steps not done yet, empty
    the upper, remove the journal. Interruptions and failures leave the journal to resume."""
    total = len(plan.steps)
    count = done or 0
    try:
        with plans.interruptible():
            base_fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                if done is None:
                    # The upper records which plan it is committing before the plan exists:
                    # only that plan is ever resumed (see _pending).
                    text = plan.to_json()
                    upperinfo.mark_committing(upper, plan.base, journal.digest(text))
                    journal.write(base_fd, text)
                    plans.fault_point(journal.FAULT_VARIABLE, 0)
                _apply_steps(upper, base, base_fd, work_fd, plan, count)
                count = total
                empty_upper(upper, work)
                plans.fault_point(journal.FAULT_VARIABLE, total + 1)
                journal.remove(base_fd)
                plans.fault_point(journal.FAULT_VARIABLE, total + 2)
                upperinfo.clear_committing(upper)
            finally:
                os.close(base_fd)
    except plans.Interrupted as e:
        raise CowfsError(f"commit into {str(base)!r} interrupted ({e}) after "
                         f"{journal.steps_done(base)} of {total} steps: {str(base)!r} is "
                         f"half-committed and {str(upper)!r} still holds the changes; run the "
                         f"same command again to finish it (cowfs commit {upper} --into {base} "
                         f"--yes: the journal in {str(base / journal.JOURNAL_DIR)!r} says where "
                         "it stopped)", e.exit_code) from None
    except journal.StepFailedError as e:
        raise CowfsError(f"commit into {str(base)!r} stopped at step {e.number} of {total} "
                         f"({e.step.op.value} {quote(e.step.path)}): {e.reason}; fix the cause "
                         "and run the same command again to finish it") from None
    except OSError as e:
        raise CowfsError(f"commit into {str(base)!r} stopped: {e.strerror}; fix the cause and "
                         "run the same command again to finish it") from None


def _apply_steps(upper: Path, base: Path, base_fd: int, work_fd: int | None,
                 plan: journal.Journal, done: int) -> None:
    todo = plan.steps[done:]
    applier = journal.Applier(upper, base, work_fd)
    progress = journal.Progress(base_fd)
    try:
        with plans.Progress(sum(applier.data_size(step) for step in todo), "commit") as bar:
            applier.on_bytes = bar.advance
            for number, step in enumerate(todo, start=done + 1):
                try:
                    applier.apply(number, step)
                except OSError as e:
                    raise journal.StepFailedError(number, step, e.strerror or str(e)) from None
                plans.fault_point(journal.UNRECORDED_FAULT_VARIABLE, number)
                progress.done(number)
                plans.fault_point(journal.FAULT_VARIABLE, number)
    finally:
        progress.close()
        applier.close()


def _reset_targets(upper_fd: int, path: str) -> list[str]:
    """What resetting ``path`` removes from the upper: the object there, and for a renamed
    directory also the whiteout at its old name (so that the original shows again)."""
    try:
        with plans.parent_of(upper_fd, path) as (dirfd, name):
            found = realfs.open_path(dirfd, name)
    except OSError:  # a missing or non-directory component: nothing of it is in the upper
        return []
    if found is None:
        return []
    targets = [path]
    try:
        redirect = realfs.getxattr(found, schema.XATTR_REDIRECT) \
            if stat.S_ISDIR(os.fstat(found).st_mode) else None
    finally:
        os.close(found)
    try:
        target = schema.parse_redirect(redirect) if redirect is not None else None
    except ValueError:
        target = None  # the mount refuses it: it hides nothing at another name
    if target is None:
        return targets
    source = redirect_source(path, target)
    try:
        with plans.parent_of(upper_fd, source) as (dirfd, name):
            old = realfs.open_path(dirfd, name)
    except OSError:
        old = None
    if old is not None:
        st = os.fstat(old)
        os.close(old)
        if st.st_size == 0 and not stat.S_ISDIR(st.st_mode):
            targets.append(source)
    return targets


def reset(upper: Path, paths: Sequence[str], *, yes: bool, dry_run: bool,
          out: TextIO | None = None) -> None:
    """Throw away all of ``upper``'s changes, or those at and under ``paths``."""
    with mounts.exclusive_upper(upper, "reset"):
        upperinfo.require_upper(upper, "reset")
        upperinfo.refuse_if_committing(upper, "reset")
        wanted = [plans.relative_path(p) for p in paths]
        fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not wanted or "." in wanted:
                names = [n for n in realfs.list_names(fd) if n != schema.WORK_DIR_NAME]
                if not names:
                    print("nothing to reset", file=out)
                    return
                plan = [f"discard {quote(n)}" for n in sorted(names)]
                if plans.confirm(plan, yes=yes, dry_run=dry_run, out=out,
                                  question=f"Discard every change in {str(upper)!r}?"):
                    empty_upper(upper)
                    print(f"reset {upper}: all changes discarded", file=out)
                return
            targets: list[str] = []
            unmatched: list[str] = []
            for path in wanted:
                if path.split("/")[0] == schema.WORK_DIR_NAME:
                    raise CowfsError(f"{path!r} is inside the work directory, not a change")
                found = _reset_targets(fd, path)
                if not found:
                    unmatched.append(quote(path))
                targets += [t for t in found if t not in targets]
            if unmatched:
                # As git does for a pathspec that matches nothing: a typo must not pass for done.
                raise CowfsError(f"no change at {', '.join(unmatched)} in {str(upper)!r}: "
                                 "nothing was reset ('cowfs diff' lists the changes)")
            plan = [f"discard {quote(t)}" for t in targets]
            if plans.confirm(plan, yes=yes, dry_run=dry_run, out=out,
                              question="Discard these changes?"):
                for target in targets:
                    with plans.parent_of(fd, target) as (dirfd, name):
                        plans.remove_if_present(dirfd, name)
                print(f"reset {counted(len(targets), 'path')} in {upper}", file=out)
        finally:
            os.close(fd)
