"""Attributes of the merged view: getattr and setattr (the kernel's fs/overlayfs/inode.c).

getattr: every reply that carries attributes (lookup, getattr, setattr, the namespace changes,
readdirplus) carries one :class:`Attributes` record, built in one place (:func:`attributes`) from
one ``fstat`` of the topmost real object, with what the merged view changes in it:

* the inode number is the inode's own (lookup derived it from the object's origin:
  :mod:`cowfs.daemon.namei`), not the real object's;
* the link count is 1 for a directory made of several layers (as the kernel reports: counting its
  subdirectories is not worth it), and for a lower hard-link set copied up through the index the
  entry's names plus the lower names it still has (:mod:`cowfs.core.nlink`);
* the blocks of a metacopy file are its data file's (as the kernel reports), and for a partial
  file its upper blocks' too (:mod:`cowfs.core.partial`).

setattr: one request's changes (:class:`SetAttr`) are made on the upper copy, which is made first
with what the change needs of the data (:class:`cowfs.daemon.upperdata.Need`): a change of
metadata alone leaves the data in the lower file (metacopy), unless a ``chown`` would give the
file an owner a metacopy file may not have; a truncation brings up the blocks it keeps.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import NamedTuple

from ..core import realfs
from ..core.nlink import merged_nlink
from ..core.resolve import Data, Real
from . import upperdata
from .copyup import CopyUp
from .handles import FileHandle
from .inodes import Inode
from .upperdata import Need

log = logging.getLogger(__name__)


class Attributes(NamedTuple):
    """What a reply says of an object: the fields of ``struct stat`` the kernel uses.

    A named tuple, not a frozen dataclass as the other records: every reply builds one, and a
    frozen dataclass of twelve fields takes 3.4 µs to make (one ``object.__setattr__`` a field),
    a named tuple 0.6 µs, about half an ``fstat`` (measured with timeit on the benchmark machine).
    """

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


def attributes(inode: Inode, upper_root_fd: int, seen: os.stat_result | None = None
               ) -> Attributes:
    """The attributes of ``inode`` as the merged view shows them (see the module docstring);
    ``upper_root_fd`` is the upper layer's root, below which pending link counts are recorded.
    The usual object (not a metacopy file, not an upper hard link) costs one ``fstat`` and no
    call besides, and none in the reply to a lookup: ``seen`` is then the topmost object's
    ``lstat`` as the lookup's probe saw it (:meth:`cowfs.daemon.namei.Namei.lookup_stat`)."""
    top = inode.top
    st = top.stat() if seen is None else seen
    nlink = st.st_nlink
    if stat.S_ISDIR(st.st_mode):
        if len(inode.reals) > 1:
            nlink = 1  # merged: the kernel reports 1, counting subdirectories is not worth it
    elif top.layer.is_upper and (nlink > 1 or top.indexed):
        nlink = _merged_nlink(top, st, upper_root_fd)
    blocks = st.st_blocks if top.data is Data.OWN else _metacopy_blocks(inode, top, st)
    return Attributes(inode.number, st.st_mode, nlink, st.st_uid, st.st_gid, st.st_rdev,
                      st.st_size, st.st_blksize, blocks, st.st_atime_ns, st.st_mtime_ns,
                      st.st_ctime_ns)


def _metacopy_blocks(inode: Inode, top: Real, st: os.stat_result) -> int:
    """The blocks of a metacopy or partial file: its data file's, and for a partial file its own
    blocks' too (:func:`upperdata.blocks`); its own when its data was not found (reads fail with
    EIO)."""
    if len(inode.reals) <= 1:
        return st.st_blocks
    try:
        blocks = inode.data.stat().st_blocks
    except OSError:  # none (reads fail with EIO): its own
        return st.st_blocks
    return upperdata.blocks(inode, top, st, blocks) if top.partial else blocks


def _merged_nlink(top: Real, st: os.stat_result, upper_root_fd: int) -> int:
    """An upper non-directory's names in the merged view: an index entry's merged count
    (:mod:`cowfs.core.nlink`), else its own."""
    merged = merged_nlink(top.fd, st, upper_root_fd)
    return st.st_nlink if merged is None else merged


@dataclass(frozen=True, slots=True)
class SetAttr:
    """The attribute changes of one setattr request; None means unchanged."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None

    def touches_now(self, now_ns: int) -> bool:
        """Whether the times may be a request for the current time: pyfuse3 passes one as the
        clock's reading (the same for both times), so: set, equal, and within a second of it."""
        times = {t for t in (self.atime_ns, self.mtime_ns) if t is not None}
        return len(times) == 1 and abs(now_ns - times.pop()) < 10**9


def set_attributes(inode: Inode, change: SetAttr, handle: FileHandle | None,
                   copy_up: CopyUp) -> None:
    """Make ``change`` on the upper copy of ``inode`` (copied up first); ``handle``: the open
    file the request came through, if any (a truncation goes through it)."""
    if (change.mode is None and change.uid is None and change.gid is None
            and change.size is None and inode.upper is None and inode.any_link() is None):
        # The times of a lower object that has no name left and no upper copy: only its
        # open handles can see it, and there is nowhere to copy it up to. With the
        # writeback cache the kernel sends them at close of a file unlinked while open.
        log.debug("setattr: times of %r, which has no name and no upper copy: kept by the "
                  "kernel only", inode)
        return
    if change.size is not None:
        upper = copy_up.ensure(inode, Need.EMPTY if change.size == 0 else Need.WRITE)
    else:
        # Metadata alone: the data may stay in the lower file, unless a chown would give
        # the file an owner a metacopy file may not have (cowfs.core.metacopy).
        meta = change.uid is None or copy_up.metadata_only_owner(inode, change.uid)
        upper = copy_up.ensure(inode, Need.METADATA if meta else Need.WHOLE)
    # A partial file (or one that was, while its inode lived) is truncated by its data's owner.
    if change.size is not None and not copy_up.data.truncate(inode, upper, change.size):
        if handle is not None and handle.on_upper:
            realfs.ftruncate(handle.fd, change.size)
        else:
            realfs.truncate(upper.fd, change.size)
    if change.uid is not None or change.gid is not None:
        realfs.chown(upper.fd, -1 if change.uid is None else change.uid,
                     -1 if change.gid is None else change.gid)
    if change.mode is not None:
        realfs.chmod(upper.fd, stat.S_IMODE(change.mode))
    if change.atime_ns is not None or change.mtime_ns is not None:
        _set_times(upper, change)
    if change == SetAttr():
        # chown(path, -1, -1) changes nothing but the ctime (the kernel's FUSE sends no ctime
        # without the writeback cache): the same call on the upper copy updates it, as the
        # kernel's overlayfs does.
        realfs.chown(upper.fd, -1, -1)


def _set_times(upper: Real, change: SetAttr) -> None:
    st = upper.stat()
    try:
        realfs.utimens(upper.fd,
                       st.st_atime_ns if change.atime_ns is None else change.atime_ns,
                       st.st_mtime_ns if change.mtime_ns is None else change.mtime_ns)
    except PermissionError as e:
        # An append-only object takes the current time (utime(path, NULL)) but no explicit
        # times. pyfuse3 passes "now" as the clock's reading, both times the same: only
        # such a request is retried as one for the current time.
        if e.errno != errno.EPERM or not change.touches_now(time.time_ns()):
            raise
        realfs.utimens_now(upper.fd)
