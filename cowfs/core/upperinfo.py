"""What an upper directory says about itself: its layer format, and the lower stack it was made on.

Both are xattrs on the upper root (defined in :mod:`cowfs.core.schema`, specified in
docs/layer-format.md):

* ``user.cowfs.format``: :func:`upper_format` is the one check of it, used by the mount, the walk,
  ``cowfs check`` and the commands that change or delete an upper;
* ``user.cowfs.stack``: the lower stack, written at each read-write mount (:func:`record_stack`,
  called by :func:`cowfs.core.layers.open_stack` after it checked everything), read by the offline
  commands when no ``--lower`` is given (:func:`recorded_stack`), and checked
  by a mount and a commit, which refuse another stack unless told that the layers were moved
  (``-o relocate``, ``--relocate``).

Origins name lower inodes by layer index and inode number, redirects name lower paths, and the
hard-link index is keyed by both: over another stack they would silently mean something else.

Whoever can write the upper can write these records, so they are read as hostile input (the
threat model is in docs/workspaces.md, "What the offline commands trust"): decoded against their
schema (:mod:`cowfs.core.schema`), a lower named by a record is only ever read, a commit needs a
record naming its base (:func:`verify_stack` with ``required``), a recorded ``--work`` directory is
used only when it is verifiably the upper's (:func:`open_work_dir`), and ``user.cowfs.committing``
(:func:`commit_mark`) names the one commit journal that may be resumed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from . import realfs, schema
from .errors import CowfsError
from .wording import counted

log = logging.getLogger(__name__)


# --- the format marker ---------------------------------------------------------------------------


def upper_format(fd: int, path: Path) -> bool:
    """Whether the directory open at ``fd`` is a cowfs upper: True when it carries this version's
    format marker, False when it carries none. Raises :class:`CowfsError` for another version
    (written by another cowfs: nothing in it can be interpreted)."""
    found = realfs.getxattr(fd, schema.XATTR_FORMAT)
    if found is None:
        return False
    if found != schema.FORMAT_VERSION:
        raise CowfsError(f"upper directory {str(path)!r} has cowfs layer format "
                         f"{found.decode(errors='replace')!r}; this cowfs understands format "
                         f"{schema.FORMAT_VERSION.decode()!r}")
    return True


def upper_format_at(path: Path) -> bool:
    """:func:`upper_format` of a directory named by path (False when it is not a directory)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return upper_format(fd, path)
    finally:
        os.close(fd)


def require_upper(path: Path, what: str) -> None:
    """Refuse to ``what`` a directory that is not a cowfs upper: a command that deletes must
    never run on a plain directory (a mistyped argument)."""
    if not path.is_dir():
        raise CowfsError(f"upper directory {str(path)!r} does not exist" if not path.exists()
                         else f"upper {str(path)!r} is not a directory")
    if not upper_format_at(path):
        raise CowfsError(f"cannot {what}: {str(path)!r} is not a cowfs upper directory (it has "
                         f"no {schema.XATTR_FORMAT} marker; an upper gets it when first mounted)")


# --- an unfinished commit ------------------------------------------------------------------------


def commit_mark(upper: Path) -> schema.CommitMark | None:
    """The mark of an unfinished commit of ``upper`` (see :mod:`cowfs.tools.journal`), None when
    there is none; a malformed one is refused with a clear error."""
    try:
        value = os.getxattr(upper, schema.XATTR_COMMITTING, follow_symlinks=False)
    except OSError:
        return None
    try:
        return schema.CommitMark.from_json(value)
    except ValueError as e:
        raise CowfsError(f"upper {str(upper)!r} carries a {e} ({schema.XATTR_COMMITTING}); this "
                         "cowfs did not write it: once no commit of this upper is unfinished, "
                         f"remove it (setfattr -x {schema.XATTR_COMMITTING} UPPER)") from None


def committing_into(upper: Path) -> str | None:
    """The base an unfinished commit of ``upper`` writes into."""
    mark = commit_mark(upper)
    return None if mark is None else mark.base


def mark_committing(upper: Path, base: str, plan_digest: str) -> None:
    fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        realfs.setxattr(fd, schema.XATTR_COMMITTING,
                        schema.CommitMark(base, plan_digest).to_json())
    finally:
        os.close(fd)


def refuse_if_committing(upper: Path, what: str) -> None:
    into = committing_into(upper)
    if into is not None:
        raise CowfsError(f"cannot {what}: an interrupted commit of {str(upper)!r} into {into!r} "
                         f"is unfinished; finish it first: cowfs commit {upper} --into {into} "
                         "--yes")


def clear_committing(upper: Path) -> None:
    fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if realfs.getxattr(fd, schema.XATTR_COMMITTING) is not None:
            realfs.removexattr(fd, schema.XATTR_COMMITTING)
    finally:
        os.close(fd)


# --- the recorded lower stack --------------------------------------------------------------------


def identity_of(path: Path, fd: int) -> schema.LayerIdentity:
    st = os.fstat(fd)
    return schema.LayerIdentity(str(path), st.st_dev, st.st_ino)


def identities(lowers: Sequence[Path]) -> tuple[schema.LayerIdentity, ...]:
    """The identity of each lower, by path (the paths are taken as given: absolute, resolved)."""
    found = []
    for path in lowers:
        try:
            st = os.stat(path)
        except OSError as e:
            raise CowfsError(f"lower directory {str(path)!r}: {e.strerror}") from None
        found.append(schema.LayerIdentity(str(path), st.st_dev, st.st_ino))
    return tuple(found)


def recorded_stack(upper: Path) -> schema.StackRecord | None:
    """The stack recorded on ``upper`` (None when there is none); a malformed record is refused
    with a clear error (give ``--lower``)."""
    try:
        value = os.getxattr(upper, schema.XATTR_STACK, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.ENOENT, errno.ENOTDIR):
            return None
        raise CowfsError(f"cannot read the recorded lower stack of {str(upper)!r}: "
                         f"{e.strerror}") from None
    try:
        return schema.StackRecord.from_json(value)
    except ValueError as e:
        raise CowfsError(f"upper {str(upper)!r}: {e}; give the lower layers with --lower") \
            from None


def recorded_lowers(upper: Path) -> tuple[Path, ...] | None:
    """The lower paths recorded on ``upper`` (None without a record)."""
    record = recorded_stack(upper)
    return None if record is None else tuple(Path(i.path) for i in record.lowers)


def _describe(identity: schema.LayerIdentity) -> str:
    return f"{identity.path!r} (device {identity.dev}, inode {identity.ino})"


def stack_difference(recorded: schema.StackRecord,
                     current: Sequence[schema.LayerIdentity]) -> str | None:
    """What differs between the recorded stack and ``current``, in words; None when nothing."""
    if len(recorded.lowers) != len(current):
        return (f"it was made on {counted(len(recorded.lowers), 'lower layer')} "
                f"({':'.join(i.path for i in recorded.lowers)}), not {len(current)} "
                f"({':'.join(i.path for i in current)})")
    for n, (was, now) in enumerate(zip(recorded.lowers, current, strict=True)):
        if was != now:
            return f"lower layer {n + 1} was {_describe(was)}, now it is {_describe(now)}"
    return None


def verify_stack(upper: Path, current: Sequence[schema.LayerIdentity], *, relocate: bool,
                 what: str, override: str, required: bool = False) -> None:
    """Refuse to ``what`` over another stack than the one recorded, unless ``relocate``;
    ``required``: also when no stack is recorded (a commit: the record is what says that the
    base given is the upper's, and deletions and whiteouts would hit any other directory)."""
    recorded = recorded_stack(upper)
    if relocate:
        return
    if recorded is None:
        if required:
            raise CowfsError(f"cannot {what}: the upper {str(upper)!r} records no lower stack "
                             f"({schema.XATTR_STACK}: it was never mounted read-write, or the "
                             "record was removed), so nothing says which base it was made on; "
                             f"if it is this one, pass {override}")
        return
    difference = stack_difference(recorded, current)
    if difference is not None:
        raise CowfsError(f"cannot {what}: the upper {str(upper)!r} was made on another lower "
                         f"stack: {difference}; if the layers were moved on purpose, pass "
                         f"{override}")


def record_stack(upper_fd: int, upper: Path, current: Sequence[schema.LayerIdentity],
                 work: Path | None) -> None:
    """Write the stack record on the upper root (only when it changes)."""
    value = schema.StackRecord(tuple(current), None if work is None else str(work)).to_json()
    if len(value) > schema.STACK_RECORD_MAX:
        raise CowfsError(f"the lower stack of {counted(len(current), 'layer')} is too long to "
                         f"record on the upper ({len(value)} bytes, at most "
                         f"{schema.STACK_RECORD_MAX}); "
                         "use shorter paths or fewer layers")
    if realfs.getxattr(upper_fd, schema.XATTR_STACK) == value:
        return
    try:
        realfs.setxattr(upper_fd, schema.XATTR_STACK, value)
    except OSError as e:
        raise CowfsError(f"cannot record the lower stack on {str(upper)!r}: {e.strerror}") \
            from None




def refuse_swapped(upper: Path, upper_fd: int, lowers: Sequence[Path]) -> None:
    """Refuse a stack whose lower is a cowfs upper that records the given upper as its lower:
    the arguments are swapped (``cowfs mount UPPER BASE MNT``), and mounting would write the work
    directory and the markers into the base. Checked before anything is written."""
    st = os.fstat(upper_fd)
    for lower in lowers:
        try:
            record = recorded_stack(lower)
        except CowfsError:
            continue  # not an upper of ours to reason about: the lower is only read
        if record is not None and any((i.dev, i.ino) == (st.st_dev, st.st_ino)
                                      for i in record.lowers):
            raise CowfsError(f"cannot mount: the lower {str(lower)!r} is a cowfs upper made on "
                             f"{str(upper)!r}, given here as the upper; are the layers swapped? "
                             "('cowfs mount LOWER UPPER MOUNTPOINT'); nothing was written")


# --- the work directory of an unmounted upper ---------------------------------------------------


def verify_work(upper: Path, work: Path | None, *, relocate: bool) -> None:
    """Refuse to mount ``upper`` with another work directory (``work``: ``--work``, resolved, or
    None for the default) than the one recorded at its last read-write mount, unless
    ``relocate``: the recorded one holds the hard-link index that serves some of its names."""
    recorded = recorded_stack(upper)
    if recorded is None or relocate:
        return
    was = recorded.work
    now = None if work is None else str(work)
    if was != now:
        def shown(work: str | None) -> str:
            return "the default one (no --work)" if work is None else repr(work)

        raise CowfsError(f"cannot mount: the upper {str(upper)!r} was last mounted with work "
                         f"directory {shown(was)}, not {shown(now)}: its hard-link index is "
                         "there; give the same --work, or -o relocate to use the new one from "
                         "now on")


def recorded_work(upper: Path) -> Path | None:
    """The work directory recorded on an unmounted ``upper`` when it is not the default one
    (None: the default, also without a readable record), after checking that it is this upper's
    (:func:`open_work_dir`); a recorded one that is not is refused."""
    try:
        record = recorded_stack(upper)
    except CowfsError:
        return None  # the lowers are then given explicitly; the default work directory
    if record is None or record.work is None:
        return None
    work = Path(record.work)
    fd = open_work_dir(upper, work)
    if fd is not None:
        os.close(fd)
    return work


def open_work_dir(upper: Path, work: Path | None) -> int | None:
    """Open the work directory ``work`` of ``upper`` (None or the default path: the default one)
    for an offline command, as an ``O_PATH`` descriptor to use from then on; None when it does
    not exist.

    Nothing an upper records is trusted with another directory: the default work directory is
    reached from the upper's descriptor without following a symlink (anything but a directory
    there counts as none); a ``--work`` directory must be a directory (not a symlink) on the
    upper's filesystem, owned by the upper's owner, writable by nobody else, and carry
    :data:`~cowfs.core.schema.XATTR_WORK_UPPER` naming this upper's root, which only its mount
    writes; anything else is refused (:class:`CowfsError`).
    """
    upper_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ust = os.fstat(upper_fd)
        if work is None or work == schema.default_work_dir(upper):
            try:
                return os.open(schema.WORK_DIR_NAME, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                               | os.O_CLOEXEC, dir_fd=upper_fd)
            except OSError:
                return None
    finally:
        os.close(upper_fd)
    try:
        fd = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _not_its_work(upper, work, e.strerror or str(e)) from None
    try:
        st = os.fstat(fd)
        problem = None
        if st.st_dev != ust.st_dev:
            problem = "it is on another filesystem"
        elif st.st_uid != ust.st_uid:
            problem = f"it is owned by uid {st.st_uid}, the upper by uid {ust.st_uid}"
        elif st.st_mode & 0o022:
            problem = f"it is writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
        elif realfs.getxattr(fd, schema.XATTR_WORK_UPPER) != schema.format_work_upper(
                ust.st_dev, ust.st_ino):
            problem = f"it does not carry the {schema.XATTR_WORK_UPPER} mark of this upper"
        if problem is not None:
            raise _not_its_work(upper, work, problem)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _not_its_work(upper: Path, work: Path, problem: str) -> CowfsError:
    return CowfsError(f"the work directory {str(work)!r} recorded on the upper {str(upper)!r} "
                      f"is not that upper's: {problem}; refusing to read or empty it (mount the "
                      f"upper again with --work {work} if it is its own)")
