"""``cowfs commit UPPER --into BASE`` and ``cowfs reset UPPER [PATH...]``.

Commit turns the walk's records into a plan of steps on BASE and applies it, then empties the
upper. Each non-directory is built next to its final name (data, xattrs, owner, mode, times, fsync)
and renamed over it, so a reader of BASE sees either the old or the new file, never a partial one.
Renamed directories are first moved, deepest source first, into a staging directory inside BASE
and from there to their new names, so that renames of a directory and of something inside it do
not depend on each other's order. Directory attributes are set last, deepest first, so that the
changes below them do not disturb their times. While it runs, the upper's work-directory lock is
held, so it cannot be mounted.

Known limits: the commit as a whole is not atomic. If a step fails, the staged directories are
moved back, the upper is left as it was, and running the same commit again finishes the job
(what was already applied no longer differs). Only a single lower (BASE) is supported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TextIO

from . import mounts, plans, realfs, schema
from .changes import quote, summary, visible_changes
from .errors import CowfsError
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
    Unchanged,
    redirect_source,
    walk,
)

_CHUNK = 1 << 20


class Op(Enum):
    STAGE = "stage"  # move a renamed directory's source into the staging directory
    REMOVE = "delete"
    WRITE = "write"  # a non-directory, built beside its name and renamed over it
    MKDIR = "create"
    MOVE = "rename"  # from the staging directory to the new name
    LINK = "link"
    ATTRS = "set attributes of"


@dataclass(frozen=True, slots=True)
class Step:
    op: Op
    path: str
    #: STAGE/MOVE: the staging slot; LINK: the path linked to; MOVE: also the old path (shown).
    arg: str = ""
    shown_from: str = ""
    #: WRITE/ATTRS of a name the mount served from the hard-link index: the index entry to read.
    index: str | None = None

    def describe(self) -> str | None:
        if self.op is Op.STAGE:
            return None
        if self.op is Op.MOVE:
            return f"rename  {quote(self.shown_from)}/ -> {quote(self.path)}/"
        if self.op is Op.LINK:
            return f"link    {quote(self.path)} => {quote(self.arg)}"
        return f"{self.op.value:<7} {quote(self.path)}" if self.op is not Op.ATTRS else \
            f"attrs   {quote(self.path)}"


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


# --- applying steps to a base directory ----------------------------------------------------------


def copy_file_data(src: int, dst: int) -> None:
    """Copy a whole file between two descriptors in the kernel where it can."""
    while True:
        try:
            n = os.copy_file_range(src, dst, _CHUNK)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.write(dst, os.read(src, _CHUNK))
        if n == 0:
            return


def _copyable_xattrs(fd: int) -> dict[str, bytes]:
    """The xattrs of a layer object that belong to the user, by their stored (escaped) names."""
    found = {}
    for name in realfs.listxattr(fd):
        if schema.is_copied_on_copy_up(name):
            value = realfs.getxattr(fd, name)
            if value is not None:
                found[name] = value
    return found


def copy_attributes(src_fd: int, st: os.stat_result, dst_fd: int) -> None:
    """xattrs, then owner (chown clears set-id bits), then mode, then times."""
    if not stat.S_ISLNK(st.st_mode):
        wanted = _copyable_xattrs(src_fd)
        for name in set(_copyable_xattrs(dst_fd)) - set(wanted):
            realfs.removexattr(dst_fd, name)
        for name, value in wanted.items():
            realfs.setxattr(dst_fd, name, value)
    realfs.chown(dst_fd, st.st_uid, st.st_gid)  # the object itself, also a symlink
    if not stat.S_ISLNK(st.st_mode):
        realfs.chmod(dst_fd, stat.S_IMODE(st.st_mode))
    realfs.utimens(dst_fd, st.st_atime_ns, st.st_mtime_ns)


def build_copy(src_dirfd: int, src_name: str, dirfd: int, name: str) -> None:
    """Make ``name`` in ``dirfd`` a copy of a non-directory: built under a temporary name in the
    same directory (data, xattrs, owner, mode, times, fsync), then renamed over ``name``."""
    src = realfs.open_path(src_dirfd, src_name)
    if src is None:
        raise CowfsError(f"{src_name!r} vanished from the upper while committing")
    try:
        st = os.fstat(src)
        temp = f".cowfs-commit.{os.getpid()}.{name}"[:255]
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            dst = realfs.create_file(dirfd, temp, 0o600, os.O_WRONLY)
            try:
                data = realfs.reopen(src, os.O_RDONLY)
                try:
                    copy_file_data(data, dst)
                finally:
                    os.close(data)
                os.fsync(dst)
            finally:
                os.close(dst)
        elif kind == stat.S_IFLNK:
            realfs.symlink(dirfd, temp, realfs.readlink(src))
        else:
            realfs.mknod(dirfd, temp, st.st_mode, st.st_rdev)
        try:
            fd = realfs.open_path(dirfd, temp)
            assert fd is not None, "just created"
            try:
                copy_attributes(src, st, fd)
            finally:
                os.close(fd)
            realfs.rename(dirfd, temp, dirfd, name)
        except BaseException:
            with contextlib.suppress(OSError):
                realfs.unlink(dirfd, temp)
            raise
    finally:
        os.close(src)


class _Applier:
    """Applies steps to BASE, reading objects from UPPER."""

    def __init__(self, upper: Path, base: Path) -> None:
        self.upper_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.base_fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.index_path = f"{schema.WORK_DIR_NAME}/{schema.WORK_INDEX_NAME}"
        self.staging = f".cowfs-commit-{os.getpid()}"
        self.staged: list[Step] = []

    def close(self) -> None:
        os.close(self.upper_fd)
        os.close(self.base_fd)

    def apply(self, step: Step) -> None:
        getattr(self, "_" + step.op.name.lower())(step)

    def _stage(self, step: Step) -> None:
        if not self.staged:
            realfs.mkdir(self.base_fd, self.staging, 0o700)
        with plans.parent_of(self.base_fd, step.path) as (dirfd, name), \
                plans.parent_of(self.base_fd, f"{self.staging}/{step.arg}") as (sfd, slot):
            realfs.rename(dirfd, name, sfd, slot, realfs.RENAME_NOREPLACE)
        self.staged.append(step)

    def _move(self, step: Step) -> None:
        with plans.parent_of(self.base_fd, step.path) as (dirfd, name), \
                plans.parent_of(self.base_fd, f"{self.staging}/{step.arg}") as (sfd, slot):
            plans.remove_if_present(dirfd, name)
            realfs.rename(sfd, slot, dirfd, name, realfs.RENAME_NOREPLACE)
        self.staged = [s for s in self.staged if s.arg != step.arg]

    def _remove(self, step: Step) -> None:
        with plans.parent_of(self.base_fd, step.path) as (dirfd, name):
            plans.remove_if_present(dirfd, name)

    def _mkdir(self, step: Step) -> None:
        with plans.parent_of(self.base_fd, step.path) as (dirfd, name):
            found = realfs.open_path(dirfd, name)
            if found is not None:
                is_dir = stat.S_ISDIR(os.fstat(found).st_mode)
                os.close(found)
                if is_dir:
                    return
                realfs.unlink(dirfd, name)
            realfs.mkdir(dirfd, name, 0o700)

    def _source(self, step: Step) -> str:
        """Where the object to copy is, relative to the upper."""
        return step.path if step.index is None else f"{self.index_path}/{step.index}"

    def _write(self, step: Step) -> None:
        with plans.parent_of(self.upper_fd, self._source(step)) as (ufd, uname), \
                plans.parent_of(self.base_fd, step.path) as (dirfd, name):
            build_copy(ufd, uname, dirfd, name)

    def _link(self, step: Step) -> None:
        with plans.parent_of(self.base_fd, step.arg) as (tfd, tname), \
                plans.parent_of(self.base_fd, step.path) as (dirfd, name):
            temp = f".cowfs-commit.{os.getpid()}.{name}"[:255]
            os.link(tname, temp, src_dir_fd=tfd, dst_dir_fd=dirfd, follow_symlinks=False)
            realfs.rename(dirfd, temp, dirfd, name)

    def _attrs(self, step: Step) -> None:
        with plans.parent_of(self.upper_fd, self._source(step)) if step.path != "." else \
                contextlib.nullcontext((self.upper_fd, ".")) as (ufd, uname), \
                plans.parent_of(self.base_fd, step.path) if step.path != "." else \
                contextlib.nullcontext((self.base_fd, ".")) as (dirfd, name):
            src = os.open(uname, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=ufd)
            try:
                dst = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                try:
                    copy_attributes(src, os.fstat(src), dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)

    def finish(self) -> None:
        if self.staged:
            raise AssertionError("staged directories were not all placed")
        with contextlib.suppress(FileNotFoundError):
            realfs.rmdir(self.base_fd, self.staging)

    def roll_back_staging(self) -> None:
        """After a failure: put staged directories back where they came from."""
        for step in reversed(self.staged):
            slot_path = f"{self.staging}/{step.arg}"
            with contextlib.suppress(OSError), \
                    plans.parent_of(self.base_fd, step.path) as (dirfd, name), \
                    plans.parent_of(self.base_fd, slot_path) as (sfd, slot):
                realfs.rename(sfd, slot, dirfd, name, realfs.RENAME_NOREPLACE)
        with contextlib.suppress(OSError):
            realfs.rmdir(self.base_fd, self.staging)


# --- emptying an upper ---------------------------------------------------------------------------

def empty_upper(upper: Path) -> None:
    """Remove every change from ``upper``, keeping its format marker and its work directory.

    The work directory's scratch area and index go too: the index names copies in the upper, and
    there are none left.
    """
    fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in realfs.list_names(fd):
            if name != schema.WORK_DIR_NAME:
                realfs.remove_tree(fd, name)
        with contextlib.suppress(OSError):
            realfs.removexattr(fd, schema.XATTR_OPAQUE)
        work = realfs.open_path(fd, schema.WORK_DIR_NAME)
        if work is not None:
            try:
                if stat.S_ISDIR(os.fstat(work).st_mode):
                    plans.remove_if_present(work, schema.WORK_INDEX_NAME)
                    tmp = realfs.open_path(work, schema.WORK_TMP_NAME)
                    if tmp is not None:
                        try:
                            for name in realfs.list_names(tmp):
                                realfs.remove_tree(tmp, name)
                        finally:
                            os.close(tmp)
            finally:
                os.close(work)
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
    for mount in mounts.running_mounts():
        if not mount.alive:
            continue
        if mount.mountpoint == real_base or mount.mountpoint in real_base.parents:
            raise CowfsError(f"cannot commit: {str(base)!r} is under the cowfs mount at "
                             f"{str(mount.mountpoint)!r}; unmount it first")
        if any(real_base == p or p in real_base.parents for p in mount.lowers):
            raise CowfsError(f"cannot commit: {str(base)!r} is a lower layer of the cowfs mount "
                             f"at {str(mount.mountpoint)!r}; unmount it first")


def commit(upper: Path, base: Path, *, yes: bool, dry_run: bool,
           out: TextIO | None = None) -> str:
    """Apply ``upper``'s changes to ``base``, then empty it. Returns the summary line."""
    with mounts.exclusive_upper(upper, "commit"):
        _check_base(base, upper)
        records = list(walk(upper, [base]))
        problems = [r for r in records
                    if isinstance(r, Anomaly) and r.problem is not Problem.STRAY_WHITEOUT]
        if problems:
            raise CowfsError(f"{str(upper)!r} has {len(problems)} problem(s), e.g. "
                             f"{quote(problems[0].path)}: {problems[0].problem.value}; "
                             f"run 'cowfs check {upper}' first")
        changes = visible_changes(records)
        steps = plan_commit(records)
        if not changes:
            print("nothing to commit", file=out)
            return "no changes"
        plan = [line for step in steps if (line := step.describe()) is not None]
        plan.append(f"then empty {str(upper)!r}")
        if not plans.confirm(plan, yes=yes, dry_run=dry_run, out=out,
                              question=f"Apply these changes to {str(base)!r}?"):
            return summary(changes)
        applier = _Applier(upper, base)
        try:
            with plans.Progress(len(steps), "commit") as progress:
                for step in steps:
                    try:
                        applier.apply(step)
                    except OSError as e:
                        applier.roll_back_staging()
                        raise CowfsError(f"commit stopped at {step.op.value} "
                                         f"{quote(step.path)}: {e.strerror}; the upper is "
                                         "unchanged, run the same commit again to finish") \
                            from None
                    progress.advance()
            applier.finish()
        finally:
            applier.close()
        empty_upper(upper)
    result = summary(changes)
    print(f"committed into {base}: {result}", file=out)
    return result


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
            for path in wanted:
                if path.split("/")[0] == schema.WORK_DIR_NAME:
                    raise CowfsError(f"{path!r} is inside the work directory, not a change")
                found = _reset_targets(fd, path)
                if not found:
                    print(f"no change at {quote(path)}", file=out)
                targets += [t for t in found if t not in targets]
            if not targets:
                return
            plan = [f"discard {quote(t)}" for t in targets]
            if plans.confirm(plan, yes=yes, dry_run=dry_run, out=out,
                              question="Discard these changes?"):
                for target in targets:
                    with plans.parent_of(fd, target) as (dirfd, name):
                        plans.remove_if_present(dirfd, name)
                print(f"reset {len(targets)} path(s) in {upper}", file=out)
        finally:
            os.close(fd)
