"""The commit journal, and the steps of a commit applied to a base directory.

A commit is planned in full (:func:`cowfs.tools.workspace.plan_commit`), then written as a journal
in ``BASE/.cowfs-commit/`` before the first change: ``plan.json`` (the steps, written to a temporary
name, fsynced and renamed into place) and ``done`` (one line appended per finished step). The same
directory holds the staging slots of renamed directories. Every step is idempotent from any
state an interruption can leave it in (see :class:`Applier`), so a commit cut short at any point,
by a signal, SIGKILL or a failed step, is finished by running the same command again: it finds the
journal, re-applies the step that was in flight and goes on. While the journal exists, the upper
carries ``user.cowfs.committing`` (the base), and mounting it, resetting it or repairing it is
refused: they would change what the journal describes.

Temporary objects built beside their final names are ``.cowfs-commit.<step>``, replaced when the
step runs again.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import msgspec

from ..core import realfs, schema
from ..core.dirstack import PathDirs
from ..core.errors import CowfsError
from . import plans
from .changes import quote

#: The journal directory in BASE; also the staging directory of renamed directories.
JOURNAL_DIR = ".cowfs-commit"
PLAN_NAME = "plan.json"
DONE_NAME = "done"
JOURNAL_VERSION = 2
#: Test seam (see :func:`cowfs.tools.plans.fault_point`): ``N:SIGNAL`` sends SIGNAL to the
#committing
#: process after the N-th journal event (0: the journal is written; 1..M: step N is done;
#: M+1: the upper is emptied; M+2: the journal is removed).
FAULT_VARIABLE = "COWFS_TEST_COMMIT_FAULT"
#: Test seam: ``N:SIGNAL`` after step N was applied but before it was recorded as done (the
#: re-run applies it again).
UNRECORDED_FAULT_VARIABLE = "COWFS_TEST_COMMIT_FAULT_UNRECORDED"

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




class StepFailedError(Exception):
    """Step ``number`` failed with ``reason``; the journal stays, to be resumed."""

    def __init__(self, number: int, step: Step, reason: str) -> None:
        super().__init__(f"step {number}: {reason}")
        self.number = number
        self.step = step
        self.reason = reason


# --- the journal ---------------------------------------------------------------------------------


class _StepJSON(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    op: str
    path: str
    arg: str
    shown_from: str
    index: str | None


class _JournalJSON(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    upper: str
    base: str
    summary: str
    steps: list[_StepJSON]


#: The largest plan read: about 200 bytes a step, for 10 million steps.
PLAN_READ_MAX = 2 << 30


@dataclass(frozen=True, slots=True)
class Journal:
    """A commit in progress: what it was asked to do, and every step it takes.

    ``plan.json`` is JSON ``{"version": 2, "upper": "/abs", "base": "/abs", "summary": "...",
    "steps": [["WRITE", "dir/file", "", "", null], ...]}``: each step ``[op, path, arg,
    shown_from, index]`` as :class:`Step`. Version 1 also named a work directory; the work
    directory is now always the upper's own (:func:`cowfs.core.upperinfo.open_work_dir`), never one
    a journal names.
    """

    upper: str
    base: str
    steps: tuple[Step, ...]
    summary: str

    def to_json(self) -> bytes:
        return msgspec.json.encode(_JournalJSON(
            JOURNAL_VERSION, self.upper, self.base, self.summary,
            [_StepJSON(s.op.name, s.path, s.arg, s.shown_from, s.index) for s in self.steps]))

    @classmethod
    def from_json(cls, text: bytes | str) -> Journal:
        """Parse an (untrusted) plan: anything that does not fit the schema, and any step whose
        paths could leave the base (or the upper, or the index), is refused (ValueError)."""
        if len(text) > PLAN_READ_MAX:
            raise ValueError(f"unreadable commit journal: {len(text)} bytes")
        try:
            data = msgspec.json.decode(text, type=_JournalJSON)
        except (msgspec.DecodeError, RecursionError) as e:
            raise ValueError(f"unreadable commit journal: {str(e).splitlines()[0]}") from None
        if data.version != JOURNAL_VERSION:
            raise ValueError(f"unknown journal version {data.version!r} (finish that commit "
                             "with the cowfs that started it)")
        if not (schema.is_plain_absolute(data.upper) and schema.is_plain_absolute(data.base)):
            raise ValueError("unreadable commit journal: the upper or the base is not a plain "
                             "absolute path")
        return cls(data.upper, data.base, tuple(_step(n, s) for n, s in
                                                enumerate(data.steps, start=1)),
                   data.summary)


def _step(number: int, raw: _StepJSON) -> Step:
    """A step of a plan read back, checked: every path it names is a plain relative path (no
    ``..``, empty or absolute components), a staging slot is a number, an index entry a valid
    entry name; ``.`` (the root) only as the path of an ATTRS step."""
    try:
        op = Op[raw.op]
    except KeyError:
        raise ValueError(f"unreadable commit journal: step {number}: unknown operation "
                         f"{raw.op[:20]!r}") from None
    step = Step(op, raw.path, raw.arg, raw.shown_from, raw.index)
    paths = [raw.path] if not (op is Op.ATTRS and raw.path == ".") else []
    if op is Op.LINK:
        paths.append(raw.arg)
    if op is Op.MOVE:
        paths.append(raw.shown_from)
    slot_ok = raw.arg.isascii() and raw.arg.isdigit() if op in (Op.STAGE, Op.MOVE) else \
        op is Op.LINK or raw.arg == ""
    index_ok = raw.index is None or (op in (Op.WRITE, Op.ATTRS)
                                     and schema.parse_index_name(raw.index) is not None)
    if not (all(schema.is_plain_relative(p) for p in paths) and slot_ok and index_ok):
        raise ValueError(f"unreadable commit journal: step {number} ({op.value} "
                         f"{raw.path[:80]!r}) names a path outside the layer")
    return step


@dataclass(frozen=True, slots=True)
class Found:
    """A journal read from BASE: the plan, its SHA-256 (to compare with the upper's
    :class:`~cowfs.core.schema.CommitMark`), and how many of its steps are done."""

    journal: Journal
    digest: str
    done: int


def digest(plan: bytes) -> str:
    return hashlib.sha256(plan).hexdigest()


def load(base: Path) -> Found | None:
    """The journal of an unfinished commit into ``base``, or None.

    Anyone who can write BASE can put a journal there; this one is read only when the journal
    directory, its plan and its progress file belong to the user running the commit (who wrote
    them) and nobody else can write them, reached without following symlinks. Whether it is
    the journal of the upper being committed is the caller's check (its digest against the
    upper's mark), as is a ``done`` count within the plan."""
    try:
        base_fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise CowfsError(f"cannot open {str(base)!r}: {e.strerror}") from None
    where = str(base / JOURNAL_DIR)
    try:
        try:
            dir_fd = os.open(JOURNAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                             os.O_CLOEXEC, dir_fd=base_fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise CowfsError(f"cannot read the commit journal {where!r}: {e.strerror}") \
                from None
        try:
            _check_owned(dir_fd, where)
            plan = _read_owned(dir_fd, PLAN_NAME, where)
            if plan is None:
                return None  # interrupted before its plan was in place: nothing was changed
            try:
                found = Journal.from_json(plan)
            except ValueError as e:
                raise CowfsError(f"{where!r}: {e}") from None
            progress = _read_owned(dir_fd, DONE_NAME, where) or b""
            done = _last_number(progress)
            if done > len(found.steps):
                raise CowfsError(f"{where!r}: {done} steps recorded as done, of a plan of "
                                 f"{len(found.steps)}; refusing this journal")
            return Found(found, digest(plan), done)
        finally:
            os.close(dir_fd)
    finally:
        os.close(base_fd)


def _check_owned(fd: int, where: str) -> None:
    st = os.fstat(fd)
    if st.st_uid != os.geteuid():
        raise CowfsError(f"the commit journal {where!r} is owned by uid {st.st_uid}, not by the "
                         f"committing user (uid {os.geteuid()}); refusing to resume it (a "
                         "journal is resumed by the user who started the commit)")
    if st.st_mode & 0o022:
        raise CowfsError(f"the commit journal {where!r} is writable by other users (mode "
                         f"{stat.S_IMODE(st.st_mode):o}); refusing to resume it")


def _read_owned(dir_fd: int, name: str, where: str) -> bytes | None:
    """A regular file of the journal directory, checked as :func:`_check_owned` (None when
    missing)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CowfsError(f"cannot read {name!r} of the commit journal {where!r}: "
                         f"{e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CowfsError(f"{name!r} of the commit journal {where!r} is not a regular file")
        _check_owned(fd, f"{where}/{name}")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            if sum(map(len, chunks)) > PLAN_READ_MAX:
                raise CowfsError(f"{name!r} of the commit journal {where!r} is too long")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _last_number(progress: bytes) -> int:
    """The last complete line of ``done`` (the last line may be cut short)."""
    complete = [n for n in progress.split(b"\n")[:-1] if n.isdigit() and len(n) <= 12]
    return int(complete[-1]) if complete else 0


def steps_done(base: Path) -> int:
    """How many steps the journal records as finished (for a message; 0 when unreadable).
    Read as :func:`load` reads it: never through a symlink, never from a file of another user
    (a FIFO put there would block)."""
    try:
        base_fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            dir_fd = os.open(JOURNAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                             os.O_CLOEXEC, dir_fd=base_fd)
        finally:
            os.close(base_fd)
        try:
            return _last_number(_read_owned(dir_fd, DONE_NAME, str(base)) or b"")
        finally:
            os.close(dir_fd)
    except (OSError, CowfsError):
        return 0


def write(base_fd: int, plan: bytes) -> None:
    """Create the journal directory and its plan (``Journal.to_json``), durably, before the
    first change."""
    with contextlib.suppress(FileExistsError):
        realfs.mkdir(base_fd, JOURNAL_DIR, 0o700)
    with plans.parent_of(base_fd, f"{JOURNAL_DIR}/{PLAN_NAME}") as (dirfd, name):
        _check_owned(dirfd, JOURNAL_DIR)
        temp = name + ".new"
        plans.remove_if_present(dirfd, temp)
        fd = realfs.create_file(dirfd, temp, 0o600, os.O_WRONLY | os.O_TRUNC)
        try:
            written = 0
            while written < len(plan):
                written += os.write(fd, plan[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        realfs.rename(dirfd, temp, dirfd, name)
        fd = realfs.open_dir(dirfd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Progress:
    """Appends one line per finished step to ``done``."""

    def __init__(self, base_fd: int) -> None:
        # Through the journal directory's descriptor: whoever can write BASE cannot swap it
        # for a symlink on the way.
        with plans.parent_of(base_fd, f"{JOURNAL_DIR}/{DONE_NAME}") as (dirfd, name):
            self.fd = os.open(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW |
                              os.O_CLOEXEC, 0o600, dir_fd=dirfd)

    def done(self, count: int) -> None:
        os.write(self.fd, f"{count}\n".encode())

    def close(self) -> None:
        os.close(self.fd)


def remove(base_fd: int) -> None:
    """Remove the journal (the commit is complete). Staging slots are all empty by then."""
    with contextlib.suppress(FileNotFoundError):
        realfs.remove_tree(base_fd, JOURNAL_DIR)


# --- applying steps to a base directory ----------------------------------------------------------


def copy_file_data(src: int, dst: int, on_bytes: Callable[[int], None] | None = None) -> None:
    """Copy a whole file between two descriptors in the kernel where it can; ``on_bytes`` is
    told each chunk's size (the progress bar)."""
    while True:
        try:
            n = os.copy_file_range(src, dst, _CHUNK)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = os.write(dst, os.read(src, _CHUNK))
        if n == 0:
            return
        if on_bytes is not None:
            on_bytes(n)


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


def build_copy(src_dirfd: int, src_name: str, dirfd: int, name: str, temp: str,
               on_bytes: Callable[[int], None] | None = None) -> None:
    """Make ``name`` in ``dirfd`` a copy of a non-directory: built under the name ``temp`` in the
    same directory (data, xattrs, owner, mode, times, fsync), then renamed over ``name``. A
    ``temp`` left by an interrupted run is replaced."""
    src = realfs.open_path(src_dirfd, src_name)
    if src is None:
        raise CowfsError(f"{src_name!r} vanished from the upper while committing")
    try:
        st = os.fstat(src)
        plans.remove_if_present(dirfd, temp)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFREG:
            dst = realfs.create_file(dirfd, temp, 0o600, os.O_WRONLY)
            try:
                data = realfs.reopen(src, os.O_RDONLY)
                try:
                    copy_file_data(data, dst, on_bytes)
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


class Applier:
    """Applies steps to BASE, reading objects from UPPER. Every step can be applied again after
    it was cut short (or after it completed), with the same result: that is what lets a re-run
    resume a journal at the step that was in flight."""

    def __init__(self, upper: Path, base: Path, work_fd: int | None,
                 on_bytes: Callable[[int], None] | None = None) -> None:
        """``work_fd``: the upper's work directory, checked to be its own
        (:func:`cowfs.core.upperinfo.open_work_dir`; None: there is none), whose index serves some
        names; never one a journal or a record names."""
        self.on_bytes = on_bytes
        self.upper_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.base_fd = os.open(base, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.index_fd = -1
        if work_fd is not None:
            with contextlib.suppress(OSError):
                self.index_fd = os.open(schema.WORK_INDEX_NAME, os.O_PATH | os.O_DIRECTORY |
                                        os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=work_fd)
        # Steps come in tree order: the directories of the last path are kept open (a tree
        # 10,000 levels deep is not opened again from its root at each step).
        self.upper = PathDirs(self.upper_fd)
        self.base = PathDirs(self.base_fd)

    def close(self) -> None:
        self.upper.close()
        self.base.close()
        os.close(self.upper_fd)
        os.close(self.base_fd)
        if self.index_fd >= 0:
            os.close(self.index_fd)

    def apply(self, number: int, step: Step) -> None:
        """Apply step ``number`` (its temporary names derive from it)."""
        if step.op in (Op.STAGE, Op.MOVE, Op.REMOVE, Op.MKDIR):  # may move or remove a directory
            self.base.forget(step.path)
        getattr(self, "_" + step.op.name.lower())(step, f"{JOURNAL_DIR}.{number}")

    def _stage(self, step: Step, _temp: str) -> None:
        with self.base.parent_of(f"{JOURNAL_DIR}/{step.arg}") as (sfd, slot):
            if _exists(sfd, slot):
                return  # staged before an interruption
            with self.base.parent_of(step.path) as (dirfd, name):
                realfs.rename(dirfd, name, sfd, slot, realfs.RENAME_NOREPLACE)

    def _move(self, step: Step, _temp: str) -> None:
        with self.base.parent_of(f"{JOURNAL_DIR}/{step.arg}") as (sfd, slot):
            if not _exists(sfd, slot):
                return  # moved before an interruption
            with self.base.parent_of(step.path) as (dirfd, name):
                plans.remove_if_present(dirfd, name)
                realfs.rename(sfd, slot, dirfd, name, realfs.RENAME_NOREPLACE)

    def _remove(self, step: Step, _temp: str) -> None:
        with self.base.parent_of(step.path) as (dirfd, name):
            plans.remove_if_present(dirfd, name)

    def _mkdir(self, step: Step, _temp: str) -> None:
        with self.base.parent_of(step.path) as (dirfd, name):
            found = realfs.open_path(dirfd, name)
            if found is not None:
                is_dir = stat.S_ISDIR(os.fstat(found).st_mode)
                os.close(found)
                if is_dir:
                    return
                realfs.unlink(dirfd, name)
            realfs.mkdir(dirfd, name, 0o700)

    def _source(self, step: Step) -> contextlib.AbstractContextManager[tuple[int, str]]:
        """Where the object to copy is: in the upper, or in the work directory's index."""
        if step.index is None:
            return self.upper.parent_of(step.path)
        if self.index_fd < 0:
            raise CowfsError(f"the hard-link index entry {step.index!r} is missing")
        return contextlib.nullcontext((self.index_fd, step.index))

    def _write(self, step: Step, temp: str) -> None:
        with self._source(step) as (ufd, uname), \
                self.base.parent_of(step.path) as (dirfd, name):
            build_copy(ufd, uname, dirfd, name, temp, self.on_bytes)

    def data_size(self, step: Step) -> int:
        """The file data that ``step`` copies (0 but for a WRITE of a regular file)."""
        if step.op is not Op.WRITE:
            return 0
        try:
            with self._source(step) as (ufd, uname):
                st = os.stat(uname, dir_fd=ufd, follow_symlinks=False)
        except (OSError, CowfsError):
            return 0  # reported by the step itself
        return st.st_size if stat.S_ISREG(st.st_mode) else 0

    def _link(self, step: Step, temp: str) -> None:
        with self.base.parent_of(step.arg) as (tfd, tname), \
                self.base.parent_of(step.path) as (dirfd, name):
            plans.remove_if_present(dirfd, temp)
            target = os.stat(tname, dir_fd=tfd, follow_symlinks=False)
            with contextlib.suppress(FileNotFoundError):
                found = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                    return  # linked before an interruption (rename would keep ``temp``)
            os.link(tname, temp, src_dir_fd=tfd, dst_dir_fd=dirfd, follow_symlinks=False)
            realfs.rename(dirfd, temp, dirfd, name)

    def _attrs(self, step: Step, _temp: str) -> None:
        with self._source(step) if step.path != "." else \
                contextlib.nullcontext((self.upper_fd, ".")) as (ufd, uname), \
                self.base.parent_of(step.path) if step.path != "." else \
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


def _exists(dirfd: int, name: str) -> bool:
    fd = realfs.open_path(dirfd, name)
    if fd is None:
        return False
    os.close(fd)
    return True
