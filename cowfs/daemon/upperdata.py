"""An upper copy's data after the copy exists: the one owner of its data state.

A copy made without (all) its data changes state only here, under the inode's copy-up lock:

* ``LOWER`` (a metacopy file) becomes ``PARTIAL`` when a large file is first written: an empty
  data map, which reads the same (:mod:`cowfs.core.partial`);
* ``LOWER`` becomes ``OWN`` when it is given its data (:func:`cowfs.core.metacopy.fill`), in place
  as the kernel does (``ovl_copy_up_meta_inode_data``): nothing is renamed, so a concurrent rename
  cannot make the fill land on another name (issue 20, item 9);
* ``PARTIAL`` becomes ``OWN`` when its map is complete, or it is completed (a ``chown`` to another
  owner) or emptied (a truncation to 0) (:class:`cowfs.core.partial.PartialFile`).

A partial file's state while its inode lives is one record, :class:`PartialData`, made here (under
the copy-up lock) and hung on the inode (``Inode.partial_data``, the inode's only reference to
it). It holds the open :class:`~cowfs.core.partial.PartialFile` (its map, what of it is not on disk
yet, reads that combine the upper blocks with the lower file, writes that copy blocks in, when the
map is persisted). Everything else asks it: a handle reads and writes through it
(:mod:`cowfs.daemon.handles`), attributes ask it for a partial file's blocks, a setattr for a
truncation, the facade and the adapter whether there is unsaved state and to persist it, the inode
to let it go at release. No other daemon module touches :mod:`cowfs.core.partial`
(``tests/test_tools_stack.py`` checks it), so the rules of section 11b of docs/layer-format.md
(data before map, which ``fdatasync`` goes where) are kept in these two modules alone.

Making a copy is :mod:`cowfs.daemon.copyup`'s (which asks here for a new partial copy's map and for
the rest of a lower partial file's content); finding a copy's data at lookup is lookup's
(:mod:`cowfs.daemon.namei`, the kernel's namei.c).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
from collections.abc import Callable

from ..core import metacopy, partial, realfs, schema
from ..core.resolve import Data, Real
from ..core.workdir import WorkDir
from .inodes import Inode

log = logging.getLogger(__name__)


class Need(enum.Enum):
    """What a caller of :meth:`CopyUp.ensure` needs of the upper copy."""

    #: A change of metadata or of name: a copy without its data is enough (a regular file is
    #: copied so unless ``-o nometacopy``, :mod:`cowfs.core.metacopy`).
    METADATA = "metadata"
    #: A write: the data, where a large file's partial copy is enough (:mod:`cowfs.core.partial`).
    WRITE = "write"
    #: All the data in the copy itself (a ``chown`` to another owner: no lower data behind it).
    WHOLE = "whole"
    #: None of the data: the file is about to be truncated to size 0.
    EMPTY = "empty"


class PartialData:
    """A partial file's data while its inode lives: the one record of its state.

    Shared by every open of the file. Its :class:`~cowfs.core.partial.PartialFile` serialises
    writes, truncations and persistence itself; reads take the map as it is. Made once per
    partial file of an inode (under the copy-up lock) and kept, completed or not, until the
    inode's release: a completed file reads and writes its upper copy through it.

    A partial file of a lower layer that is copied up is *retired* (:meth:`UpperData.copied_up`):
    its data is no longer what the file shows, so handles stop using it, but it stays open until
    the release, since reads in other threads may still be using it.
    """

    __slots__ = ("_file", "_number", "before", "retired")

    def __init__(self, number: int, opened: partial.PartialFile,
                 before: PartialData | None) -> None:
        self._number = number
        self._file = opened
        #: A retired record this one replaced: closed with it.
        self.before = before
        #: Copied up (a lower partial file): see the class docstring.
        self.retired = False

    # --- what a handle does with the file's data (the interface of handles.FileData) --------

    def read(self, offset: int, size: int) -> bytes:
        return self._file.read(offset, size)

    def write(self, offset: int, data: bytes, *, sync: bool) -> int:
        """Write at ``offset``. A write that brings blocks up records the map before it returns
        (its data on disk first): ``close`` reports nothing (cowfs answers no FLUSH), so this
        write is where a failure to record them is reported, and its data is then not the
        file's (:meth:`PartialFile.persist`). ``sync``: the handle was opened ``O_(D)SYNC``."""
        opened = self._file
        n = opened.write(offset, data)
        if sync:
            opened.fsync(datasync=True)
        elif opened.dirty:
            opened.persist()
        return n

    def allocate(self, mode: int, offset: int, length: int) -> None:
        self._file.allocate(mode, offset, length)

    def seek(self, offset: int, whence: int) -> int:
        return self._file.seek(offset, whence)

    def fsync(self, datasync: bool) -> None:
        self._file.fsync(datasync)

    @property
    def unsaved(self) -> bool:
        """Whether it holds blocks whose map is not on disk yet (a truncation whose record
        failed, or what an mmap wrote since)."""
        return self._file.dirty

    def persist(self) -> None:
        """Put the map on disk (its data first); raises what prevents it."""
        self._file.persist()

    # --- for the inode, attributes and setattr ---------------------------------------------

    def save(self) -> None:
        """:meth:`persist`, logged, never raised (an ``fdatasync`` and an xattr: the adapter
        calls it in a worker thread before a forget releases the inode, and the release calls
        it again, which then has nothing left to do). Nothing for a retired record."""
        if self.retired:
            return
        try:
            self._file.persist()
        except OSError as e:
            log.warning("inode %d: cannot record a partial file's map: %s", self._number,
                        e.strerror)

    def close(self) -> None:
        """The inode is released: every descriptor is closed, this record's and those of the
        retired records before it."""
        record: PartialData | None = self
        while record is not None:
            record._file.close()
            record = record.before

    def truncate(self, size: int) -> None:
        self._file.truncate(size)

    def complete(self) -> None:
        """Copy in everything the lower file still provides: an ordinary file from now on."""
        self._file.complete()

    def blocks(self, upper: os.stat_result, data_blocks: int) -> int:
        """``st_blocks`` of the file: the upper copy's, and the lower file's share of what it
        still provides (by the map as it is now)."""
        return partial.blocks_of(upper, data_blocks, self._file.map)


def live(inode: Inode) -> PartialData | None:
    """The partial-file record a handle of ``inode`` reads and writes through (None: the file's
    data is plain, in one real file)."""
    record = inode.partial_data
    return None if record is None or record.retired else record


class UpperData:
    """The data state of a mount's upper copies after they exist; one instance per mount."""

    def __init__(self, work: WorkDir, *, sync: bool) -> None:
        self.work = work
        self.sync = sync

    def give(self, inode: Inode, upper: Real, need: Need,
             may_copy_partly: Callable[[], bool]) -> Real:
        """What ``need`` needs of a copy without (all) its data, ``upper`` (called with the
        copy-up lock held; never for :attr:`Need.METADATA`, which any copy meets)."""
        if upper.partial:
            if need is Need.WRITE:
                return upper
            return self._complete_partial(inode, truncate=need is Need.EMPTY)
        if need is Need.WRITE and may_copy_partly():
            return self._make_partial(inode, upper)
        return self._fill(inode, upper, with_data=need is not Need.EMPTY)

    def _make_partial(self, inode: Inode, upper: Real) -> Real:
        """A metacopy upper copy becomes a partial one: an empty map, which reads the same."""
        realfs.setxattr(upper.fd, schema.XATTR_DATAMAP, empty_map(upper.stat().st_size))
        made = dataclasses.replace(upper, data=Data.PARTIAL)
        inode.replace_top(made)
        return made

    def opened(self, inode: Inode, real: Real) -> None:
        """``inode`` is being opened, its data found through ``real``: a partial file's data is
        loaded (some blocks here, the rest below), for every handle of the inode to use;
        nothing for any other file."""
        if real.partial:
            self._record(inode)

    def _record(self, inode: Inode) -> PartialData:
        """The live record of a partial file (loaded on first use, kept while the inode lives)."""
        found = live(inode)
        if found is not None:
            return found
        with inode.copy_up_lock:
            return self._record_locked(inode)

    def _record_locked(self, inode: Inode) -> PartialData:
        found = inode.partial_data
        if found is not None and not found.retired:
            return found
        upper = inode.top
        data = inode.data
        opened = partial.PartialFile(upper.fd, data.fd, map_of(upper),
                                     read_only=not upper.layer.is_upper)

        def completed() -> None:
            top = inode.top
            if top.partial:
                inode.replace_top(dataclasses.replace(top, data=Data.OWN))

        opened.on_complete = completed
        record = PartialData(inode.number, opened, found)
        inode.partial_data = record
        return record

    def copied_up(self, inode: Inode) -> None:
        """``inode`` was copied up (called with the copy-up lock held): a lower partial file's
        data is no longer what it shows; reads go to the copy now."""
        record = inode.partial_data
        if record is not None:
            record.retired = True

    def truncate(self, inode: Inode, upper: Real, size: int) -> bool:
        """Truncate a partial file (or one that was partial while its inode lived: its record
        holds its writable descriptor) to ``size``; False, changing nothing, for a plain one."""
        if not upper.partial and live(inode) is None:
            return False
        self._record(inode).truncate(size)
        return True

    def unsaved(self, inode: Inode) -> PartialData | None:
        """The record of ``inode``'s partial file if it has blocks whose map is not on disk yet
        (:meth:`PartialData.save` puts it there, blocking)."""
        record = live(inode)
        return record if record is not None and record.unsaved else None

    def _complete_partial(self, inode: Inode, *, truncate: bool) -> Real:
        """Give a partial file all its data (or none: it is about to be truncated to 0)."""
        record = self._record_locked(inode)
        if truncate:
            record.truncate(0)
        else:
            record.complete()
        return inode.top

    def _fill(self, inode: Inode, upper: Real, with_data: bool) -> Real:
        """Give a metacopy upper copy its data, in place (called with the copy-up lock held).

        As the kernel does (``ovl_copy_up_meta_inode_data``): the data is written into the copy
        itself and its mark removed last (:func:`metacopy.fill`; the mark's removal is the commit
        point, and a crash before it leaves a metacopy file whose sparse content is never read).
        Filling in place renames nothing, so a rename of the file (which needs no copy-up lock: a
        metacopy copy is enough for it) cannot race with it: the object filled is the object the
        name has, wherever it has gone meanwhile, and its other names (``link``) stay one file.
        A copy rebuilt in the work dir and renamed over ``parent/name`` after the copy replaced a
        file created under the old name while the data was copied (issue 20, item 9).
        """
        metacopy.fill(upper.fd, inode.data.fd, with_data=with_data, sync=self.sync,
                      reflink=self.work.features.reflink)
        filled = dataclasses.replace(upper, data=Data.OWN)
        inode.replace_top(filled)
        return filled


def blocks(inode: Inode, top: Real, st: os.stat_result, data_blocks: int) -> int:
    """``st_blocks`` of a partial file ``top`` (``st``) whose data file has ``data_blocks``: by
    its live record's map, else by the map on disk; ``data_blocks`` when it has none that
    can be read (its reads fail)."""
    record = live(inode)
    if record is not None:
        return record.blocks(st, data_blocks)
    try:
        dmap = partial.read_map(top.fd)
    except ValueError:
        return data_blocks
    return data_blocks if dmap is None else partial.blocks_of(st, data_blocks, dmap)


def empty_map(size: int) -> bytes:
    """The data map of a new partial copy of a ``size``-byte file: no block up yet."""
    return partial.DataMap.empty(size).encode()


def lower_rest(lower: Real, data: Real) -> Callable[[int, int], None]:
    """For copying a partial file of a lower layer (an older upper) whole: what fills in, after
    its own blocks were copied, the rest from its data file ``data``
    (:func:`partial.fill_missing`: ``fill(dst, size)``). Its map is read now: EIO when it has
    none or it is malformed, before anything is copied."""
    dmap = map_of(lower)

    def fill(dst: int, size: int) -> None:
        src = realfs.reopen_noatime(data.fd, os.O_RDONLY)
        try:
            partial.fill_missing(dst, src, dmap, size)
        finally:
            os.close(src)

    return fill


def map_of(real: Real) -> partial.DataMap:
    """A partial file's data map; EIO when it has none or it is malformed."""
    try:
        dmap = partial.read_map(real.fd)
    except ValueError as e:
        raise OSError(errno.EIO, f"partial file with a malformed data map: {e}") from None
    if dmap is None:
        raise OSError(errno.EIO, "partial file without a data map")
    return dmap
