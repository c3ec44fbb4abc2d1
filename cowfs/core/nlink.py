"""The link count of a lower hard-link set copied up through the index, kept exact across crashes.

An index entry (``WORK/index/<layer>-<inode>``) is the upper copy of a lower object with several
names. The merged view's link count of that object is

    (the entry's st_nlink - 1)  +  user.cowfs.lowerlinks

the first term counting its names in the upper (every name linked to the entry; the index's own name
is not one), the second the names still seen through the lower layer. Linking and unlinking upper
names changes only st_nlink, in the same system call: no write, no race. Only two changes move
``lowerlinks``, each by one, and each takes effect with exactly one change of the upper at one path:

* a lower name is hidden (a whiteout, or another object renamed over it): the upper then holds
  something at that path (:attr:`Expect.PRESENT`);
* a lower name is linked into the upper (to be renamed): the path is then a link to the entry
  (:attr:`Expect.LINKED`).

Such a change first records ``user.cowfs.pending`` = new, old, expectation and path on the entry,
then changes the upper, then writes the new count and removes the record. Whoever finds a record —
a reader, or the recovery at mount after a crash — looks at the path to know which count holds. The
namespace lock (:mod:`cowfs.daemon.namespace`) keeps the path still while the record exists.
"""

from __future__ import annotations

import logging
import os

from . import realfs, schema
from .schema import Expect, Pending

log = logging.getLogger(__name__)


def _lower_links(fd: int) -> int | None:
    value = realfs.getxattr(fd, schema.XATTR_LOWER_LINKS)
    if value is None:
        return None
    count = schema.parse_number(value, schema.MAX_COUNT)
    if count is None:
        log.warning("ignoring invalid %s=%r on an index entry", schema.XATTR_LOWER_LINKS, value)
    return count


def _pending(fd: int) -> Pending | None:
    value = realfs.getxattr(fd, schema.XATTR_PENDING)
    if value is None:
        return None
    pending = schema.parse_pending(value)
    if pending is None:
        log.warning("ignoring invalid %s=%r on an index entry", schema.XATTR_PENDING, value)
    return pending


def _happened(pending: Pending, entry_ino: int, upper_root: int) -> bool:
    """Whether the upper shows the change a pending record waits for."""
    parent = realfs.open_parent(upper_root, pending.path)
    if parent is None:
        return False
    try:
        st = os.stat(pending.path[-1], dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    finally:
        os.close(parent)
    if pending.expect is Expect.LINKED:
        return st.st_ino == entry_ino
    return True


def current(fd: int, upper_root: int) -> int | None:
    """``lowerlinks`` of an entry as it stands, a pending change settled by looking (no write).
    None for an object that is not an index entry (or whose count is unreadable)."""
    pending = _pending(fd)
    if pending is not None:
        return pending.new if _happened(pending, os.fstat(fd).st_ino, upper_root) else pending.old
    return _lower_links(fd)


def merged_nlink(fd: int, st: os.stat_result, upper_root: int) -> int | None:
    """The merged view's link count of an index entry, or None for any other object."""
    lower = current(fd, upper_root)
    if lower is None:
        return None
    return st.st_nlink - 1 + lower


def initial(lower_nlink: int) -> dict[str, bytes]:
    """The xattrs of a new index entry: every name of the lower set is still seen below."""
    return {schema.XATTR_LOWER_LINKS: str(lower_nlink).encode()}


def begin(fd: int, pending: Pending, upper_root: int) -> None:
    """Record a change of the count before the upper changes (see the module docstring). A record
    left by an earlier change whose last write failed is settled first."""
    if realfs.getxattr(fd, schema.XATTR_PENDING) is not None:
        settle(fd, upper_root)
    realfs.setxattr(fd, schema.XATTR_PENDING, schema.format_pending(pending))


def finish(fd: int, pending: Pending, *, strict: bool = False) -> None:
    """The upper change happened: write the new count, then drop the record. A failure here
    leaves the record, which still says what happened: it is logged, and raised if ``strict``
    (the caller is about to move the record's path, which must not happen first)."""
    try:
        realfs.setxattr(fd, schema.XATTR_LOWER_LINKS, str(pending.new).encode())
        realfs.removexattr(fd, schema.XATTR_PENDING)
    except OSError as e:
        if strict:
            raise
        log.warning("cannot settle a link count now (settled when next read, before the next "
                    "change of one of its names, or at the next mount): %s", e.strerror)


def settle_pending(fd: int, upper_root: int) -> None:
    """Settle a record left behind by a change whose last write failed (one xattr read when
    there is none). Raises when it cannot be settled."""
    if realfs.getxattr(fd, schema.XATTR_PENDING) is not None:
        settle(fd, upper_root)


def abort(fd: int) -> None:
    """The upper change failed: drop the record (if that fails too, it still says "not done")."""
    try:
        realfs.removexattr(fd, schema.XATTR_PENDING)
    except OSError as e:
        log.warning("cannot drop a pending link count (settled at the next mount): %s", e.strerror)


def settle(fd: int, upper_root: int) -> int | None:
    """At mount: make the stored count the true one (a pending record is resolved, a format-1
    absolute count converted). Returns the count, or None if the entry has none."""
    st = os.fstat(fd)
    pending = _pending(fd)
    if pending is not None:
        count = pending.new if _happened(pending, st.st_ino, upper_root) else pending.old
        realfs.setxattr(fd, schema.XATTR_LOWER_LINKS, str(count).encode())
        realfs.removexattr(fd, schema.XATTR_PENDING)
        return count
    stored = _lower_links(fd)
    if stored is not None:
        return stored
    legacy = realfs.getxattr(fd, schema.XATTR_NLINK)
    total = schema.parse_number(legacy, schema.MAX_COUNT) if legacy is not None else None
    if total is None:
        return None
    converted = max(total - (st.st_nlink - 1), 0)
    realfs.setxattr(fd, schema.XATTR_LOWER_LINKS, str(converted).encode())
    realfs.removexattr(fd, schema.XATTR_NLINK)
    return converted
