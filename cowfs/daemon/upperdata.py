"""An upper copy's data after the copy exists: the one owner of its data state (:class:`Data`).

A copy made without (all) its data changes state only here, under the inode's copy-up lock:

* ``LOWER`` (a metacopy file) becomes ``PARTIAL`` when a large file is first written: an empty
  data map, which reads the same (:mod:`cowfs.core.partial`);
* ``LOWER`` becomes ``OWN`` when it is given its data (:func:`cowfs.core.metacopy.fill`), in place
as
  the kernel does (``ovl_copy_up_meta_inode_data``): nothing is renamed, so a concurrent rename
  cannot make the fill land on another name (issue 20, item 9);
* ``PARTIAL`` becomes ``OWN`` when its map is complete, or it is completed (a ``chown`` to another
  owner) or emptied (a truncation to 0) (:class:`cowfs.core.partial.PartialFile`).

Making a copy is :mod:`cowfs.daemon.copyup`'s; finding a copy's data at lookup is lookup's
(:mod:`cowfs.daemon.namei`, the kernel's namei.c).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
from collections.abc import Callable

from ..core import metacopy, partial, realfs, schema
from ..core.resolve import Data, Real
from ..core.workdir import WorkDir
from .inodes import Inode


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
        size = upper.stat().st_size
        realfs.setxattr(upper.fd, schema.XATTR_DATAMAP, partial.DataMap.empty(size).encode())
        made = dataclasses.replace(upper, data=Data.PARTIAL)
        inode.replace_top(made)
        return made

    def partial_of(self, inode: Inode) -> partial.PartialFile:
        """The open data of a partial file (loaded on first use, kept while the inode lives)."""
        found = inode.partial
        if found is not None:
            return found
        with inode.copy_up_lock:
            return self._partial_locked(inode)

    def _partial_locked(self, inode: Inode) -> partial.PartialFile:
        found = inode.partial
        if found is not None:
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
        inode.partial = opened
        return opened

    def _complete_partial(self, inode: Inode, *, truncate: bool) -> Real:
        """Give a partial file all its data (or none: it is about to be truncated to 0)."""
        opened = self._partial_locked(inode)
        if truncate:
            opened.truncate(0)
        else:
            opened.complete()
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


def map_of(real: Real) -> partial.DataMap:
    """A partial file's data map; EIO when it has none or it is malformed."""
    try:
        dmap = partial.read_map(real.fd)
    except ValueError as e:
        raise OSError(errno.EIO, f"partial file with a malformed data map: {e}") from None
    if dmap is None:
        raise OSError(errno.EIO, "partial file without a data map")
    return dmap
