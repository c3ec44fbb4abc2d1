"""What an upper directory says about itself: its layer format, and the lower stack it was made on.

Both are xattrs on the upper root (defined in :mod:`cowfs.schema`, specified in
docs/layer-format.md):

* ``user.cowfs.format``: :func:`upper_format` is the one check of it, used by the mount, the walk,
  ``cowfs check`` and the commands that change or delete an upper;
* ``user.cowfs.stack``: the lower stack, written at each read-write mount (:func:`record_stack`,
  called by :func:`cowfs.layers.open_stack` after it checked everything), read by the offline
  commands when no ``--lower`` is given (:func:`recorded_stack`), and checked
  by a mount and a commit, which refuse another stack unless told that the layers were moved
  (``-o relocate``, ``--relocate``).

Origins name lower inodes by layer index and inode number, redirects name lower paths, and the
hard-link index is keyed by both: over another stack they would silently mean something else.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from . import realfs, schema
from .errors import CowfsError

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


def committing_into(upper: Path) -> str | None:
    """The base an unfinished commit of ``upper`` writes into (see :mod:`cowfs.journal`)."""
    try:
        return os.fsdecode(os.getxattr(upper, schema.XATTR_COMMITTING, follow_symlinks=False))
    except OSError:
        return None


def mark_committing(upper: Path, base: str) -> None:
    fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        realfs.setxattr(fd, schema.XATTR_COMMITTING, os.fsencode(base))
    finally:
        os.close(fd)


def clear_committing(upper: Path) -> None:
    if committing_into(upper) is None:
        return
    fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        realfs.removexattr(fd, schema.XATTR_COMMITTING)
    finally:
        os.close(fd)


def refuse_if_committing(upper: Path, what: str) -> None:
    into = committing_into(upper)
    if into is not None:
        raise CowfsError(f"cannot {what}: an interrupted commit of {str(upper)!r} into {into!r} "
                         f"is unfinished; finish it first: cowfs commit {upper} --into {into} "
                         "--yes")


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
        return (f"it was made on {len(recorded.lowers)} lower layer(s) "
                f"({':'.join(i.path for i in recorded.lowers)}), not {len(current)} "
                f"({':'.join(i.path for i in current)})")
    for n, (was, now) in enumerate(zip(recorded.lowers, current, strict=True)):
        if was != now:
            return f"lower layer {n + 1} was {_describe(was)}, now it is {_describe(now)}"
    return None


def verify_stack(upper: Path, current: Sequence[schema.LayerIdentity], *, relocate: bool,
                 what: str, override: str) -> None:
    """Refuse to ``what`` over another stack than the one recorded, unless ``relocate``."""
    recorded = recorded_stack(upper)
    if recorded is None or relocate:
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
        raise CowfsError(f"the lower stack of {len(current)} layer(s) is too long to record on "
                         f"the upper ({len(value)} bytes, at most {schema.STACK_RECORD_MAX}); "
                         "use shorter paths or fewer layers")
    if realfs.getxattr(upper_fd, schema.XATTR_STACK) == value:
        return
    try:
        realfs.setxattr(upper_fd, schema.XATTR_STACK, value)
    except OSError as e:
        raise CowfsError(f"cannot record the lower stack on {str(upper)!r}: {e.strerror}") \
            from None


