"""Lookup: from a name in a merged directory to an inode (the kernel's fs/overlayfs/namei.c).

The daemon's one way from a name to an object of the merged view is :meth:`Namei.lookup`. It

1. probes the directory's real directories top-down (:func:`cowfs.core.resolve.resolve`: the merge
   rule, whiteouts, opaque marks and redirects, shared with the offline walk, so that ``cowfs
   diff`` sees what the mount shows);
2. for a metacopy (or partial) file of a lower layer (an upper written with metacopy, stacked as a
   lower), finds its data file below it (:mod:`cowfs.core.metacopy`), before numbering it: such a
   file is numbered by its data file, as it was in the mount that wrote it;
3. for a lower object with several names, puts its hard-link index entry
   (``WORK/index/<layer>-<ino>``) on top when the set was copied up, so that every name of the set
   is one file, also across mounts;
4. numbers the object by its origin (:meth:`Namei.origin_of`, :mod:`cowfs.core.origins`), verified
   before it is used, and hands it to the inode table (:meth:`InodeTable.remember`), which counts
   one kernel lookup and keeps one inode per object;
5. for an upper metacopy (or partial) file, finds its data in the lower layers.

Marks and origins are untrusted input. A mark is followed only when the mount's options enable it
and the rule of :mod:`cowfs.core.metacopy` allows it; an origin is used only once verified. What
fails is logged once and ``cowfs check`` reports it: a metacopy file without data reads ``EIO``, an
object with a refused origin gets a number of its own.

The namespace changes ask their questions about the merged view here too: whether a lower layer
shows a name (:meth:`Namei.exists_below`: it then needs a whiteout) and whether a directory shows
one (:meth:`Namei.shows`: emptiness). What the daemon probes elsewhere is one real directory, not
the merged view: a namespace change the one upper name it is about to take (as dir.c looks up the
upper dentry), a listing each name's ``fstatat`` (readdir.c), a copy-up of a hard-link set its
index entry.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

from ..core import metacopy, origins, realfs, schema
from ..core.layers import LayerStack
from ..core.refs import Descriptors, Ref
from ..core.resolve import Real, exists_below, is_hidden_name, resolve, resolve_seen
from .inodes import Inode, InodeTable

log = logging.getLogger(__name__)

#: Verified origins remembered (a few MB at most); the cache is emptied when it is full.
_VERIFIED_MAX = 1 << 16


class Held(NamedTuple):
    """What a listing with attributes shows of an object the kernel holds under the name
    already (:meth:`cowfs.daemon.vfs.Overlay.held_listed`): its file type bits and number."""

    kind: int
    number: int


class Namei:
    """Lookups of one mount."""

    def __init__(self, stack: LayerStack, table: InodeTable, descriptors: Descriptors, *,
                 metacopy: bool = True, partial_min: int = 0) -> None:
        self.upper = stack.upper
        self.table = table
        #: The layer roots by index (the upper's first): absolute redirects, origins and
        #: metacopy files' data are found from them.
        self.roots = table.root.reals
        #: Whether metacopy marks are followed (``-o nometacopy``: not).
        self.metacopy = metacopy
        #: Whether data maps are followed (partial copy-up on).
        self.partial = partial_min > 0
        #: The upper directory's owner: a metacopy file must be its or its lower file's.
        self.trusted_uid = os.fstat(stack.upper.root_fd).st_uid
        self._index_fd = stack.work.index_fd
        #: The index directory as the parent of its entries' references (:mod:`cowfs.core.refs`).
        self._index_ref: Ref | None = None
        if self._index_fd is not None:
            index_fd = os.dup(self._index_fd)
            self._index_ref = descriptors.pinned(index_fd, os.fstat(index_fd))
        #: Metacopy files whose refused mark was logged: once each.
        self._logged_data: set[str] = set()
        #: Upper objects (device, inode) whose refused origin was logged: once each.
        self._logged_origins: set[tuple[int, int]] = set()
        #: Origins verified, by upper object: the next lookup of one needs no probe.
        self._verified: dict[tuple[int, int], tuple[bytes, schema.Origin]] = {}

    def close(self) -> None:
        """Close the index directory's descriptor (the mount is gone)."""
        if self._index_ref is not None and self._index_ref.pinned >= 0:
            os.close(self._index_ref.pinned)
            self._index_ref.pinned = -1

    # --- the entry point ----------------------------------------------------------------------

    def lookup(self, parent: Inode, name: str) -> Inode | None:
        """The object at ``name`` in ``parent``, counting one kernel lookup on it; None when
        there is none."""
        found = self.lookup_stat(parent, name)
        return None if found is None else found[0]

    def lookup_stat(self, parent: Inode, name: str
                    ) -> tuple[Inode, os.stat_result | None] | None:
        """:meth:`lookup`, and the ``lstat`` its probe saw of the inode's topmost real object,
        for the reply (None when that is not what the probe saw: an inode known already and
        copied up since, an index entry on top). Its probes are lazy
        (:func:`cowfs.core.resolve.probe`): a plain lower non-directory is one ``fstatat``."""
        if is_hidden_name(parent is self.table.root, name):
            return None
        reals, st = resolve_seen(parent.child_parents, self.roots, name, lazy=True)
        if not reals:
            return None
        if reals[0].metacopy and not reals[0].layer.is_upper:
            reals = self._with_lower_data(reals)  # before numbering: see origin_of
        inode = self.remember(self._with_index_entry(reals), parent, name)
        top = inode.reals[0] if inode.reals else None
        if len(inode.reals) == 1 and top is not None and top.metacopy:
            self._attach_data(inode)  # an upper metacopy file's data, in a lower layer
        if st is not None and (top is None or top.ino != st.st_ino
                               or top.layer.dev != st.st_dev):
            st = None
        return inode, st

    def remember(self, reals: tuple[Real, ...], parent: Inode, name: str) -> Inode:
        """The inode for what a lookup of ``name`` in ``parent`` found (taking over the
        descriptors of ``reals``): numbered by its origin, one kernel lookup counted."""
        try:
            origin = self.origin_of(reals, parent.child_parents, name)
        except BaseException:
            for real in reals:  # they were the caller's to hand over: nobody else closes them
                if real.held >= 0:
                    os.close(real.held)
            raise
        return self.table.remember(reals, parent, name, origin=origin)

    def _child_reals(self, parent: Inode, name: str) -> tuple[Real, ...]:
        """The real objects behind ``name`` (caller closes them); empty when it does not exist."""
        if is_hidden_name(parent is self.table.root, name):
            return ()
        return resolve(parent.child_parents, self.roots, name)

    # --- questions of the namespace changes ---------------------------------------------------

    def shows(self, directory: Inode, name: str) -> bool:
        """Whether ``directory`` shows ``name``, counting no lookup."""
        reals = self._child_reals(directory, name)
        origins.close_reals(reals)
        return bool(reals)

    @staticmethod
    def exists_below(parent: Inode, name: str) -> bool:
        """Whether a lower layer of ``parent`` shows ``name`` (the kernel's
        ``ovl_lower_positive``): removing or moving it away then needs a whiteout."""
        return exists_below(parent.child_parents, name)

    # --- origins (cowfs.core.origins) -----------------------------------------------------------

    def origin_of(self, reals: tuple[Real, ...], parents: tuple[Real, ...] = (),
                  name: str | None = None) -> tuple[int, int]:
        """``(layer index, inode)`` of the real inode an object originates from, which its inode
        number is derived from (:class:`cowfs.daemon.inodes.InodeNumbers`): its verified origin,
        else itself. ``reals`` are what a lookup of ``name`` in the directory made of ``parents``
        found."""
        real = reals[0]
        if real.layer.is_upper:
            origin = self._verified_origin(reals, parents, name)
            if origin is not None:
                return origin.layer, origin.ino
        elif real.metacopy and len(reals) > 1:
            # A lower metacopy file is numbered by its data file, as it was in the mount that
            # wrote it, and as its copies up are (their origin names the data file).
            real = reals[1]
        return real.layer.index, origins.ino_of(real)

    def _verified_origin(self, reals: tuple[Real, ...], parents: tuple[Real, ...],
                         name: str | None) -> schema.Origin | None:
        real = reals[0]
        value = realfs.getxattr(real.fd, schema.origin_xattr(real.mode))
        if value is None:
            return None
        key = (real.layer.dev, origins.ino_of(real))
        known = self._verified.get(key)
        if known is not None and known[0] == value:
            return known[1]  # an object's verified origin stays its origin: lowers never change
        try:
            origin = schema.parse_origin(value)
            reason = origins.verify(origin, real, roots=self.roots, below=reals[1:],
                                    parents=parents, name=name, index_fd=self._index_fd)
        except ValueError as e:
            reason = str(e)
        if reason is not None:
            if key not in self._logged_origins:
                self._logged_origins.add(key)
                log.warning("ignoring the origin of upper inode %d ('cowfs check' reports it): "
                            "%s", key[1], reason)
            return None
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[key] = (value, origin)
        return origin

    # --- the hard-link index ----------------------------------------------------------------------

    def _with_index_entry(self, reals: tuple[Real, ...]) -> tuple[Real, ...]:
        """For a lower object with several names: its index entry on top, if it was copied up."""
        top = reals[0]
        index_fd = self._index_fd
        if (top.layer.is_upper or top.is_dir or top.nlink <= 1 or index_fd is None
                or not top.layer.numbers_last):
            return reals
        name = schema.index_name(top.layer.index, top.ino or os.fstat(top.fd).st_ino)
        entry = realfs.open_path(index_fd, name)
        if entry is None:
            return reals
        try:
            st = os.fstat(entry)
            at = self.index_entry_ref(name, entry)
        except BaseException:
            os.close(entry)
            raise
        return (Real(self.upper, entry, st.st_mode, indexed=True, at=at), *reals)

    def index_entry_ref(self, name: str, fd: int) -> Ref | None:
        """The reference of index entry ``name`` (``fd``), reached from the index directory
        (also for the entries copy-up makes)."""
        if self._index_ref is None:
            return None
        return self._index_ref.cache.named(self._index_ref, name, os.fstat(fd))

    # --- a metacopy or partial file's data (cowfs.core.metacopy) ------------------------------

    def _attach_data(self, inode: Inode) -> None:
        """For an inode whose upper copy is a metacopy one: find its data in the lower layers.
        When there is none (or it may not be used), reads fail with EIO; logged once."""
        data = self._find_data(inode.top, f"inode {inode.number}")
        if data is not None and not inode.attach_data(data):
            os.close(data.fd)

    def _with_lower_data(self, reals: tuple[Real, ...]) -> tuple[Real, ...]:
        """A lookup's ``reals`` for a metacopy file of a lower layer (an upper written with
        metacopy, stacked as a lower): with its data file below it, when it has one. The caller
        owns the descriptors, as of ``reals``."""
        data = self._find_data(reals[0], f"in layer {reals[0].layer.index}, inode "
                                         f"{origins.ino_of(reals[0])}")
        return reals if data is None else (*reals, data)

    def _find_data(self, marked: Real, what: str) -> Real | None:
        """The data file of a metacopy file (:func:`metacopy.find_data`), counting the origin's
        layer from the marked file's own; None (logged once) when there is none."""
        layer = marked.layer
        trusted = self.trusted_uid if layer.is_upper else os.fstat(layer.root_fd).st_uid
        try:
            self._check_enabled(marked)
            return metacopy.find_data(marked.fd, self.roots, trusted, layer_index=layer.index)
        except metacopy.NoDataError as e:
            if what not in self._logged_data:
                self._logged_data.add(what)
                log.warning("metacopy file (%s) has no usable data, reads fail with EIO "
                            "('cowfs check' reports it): %s", what, e.reason)
            return None

    def _check_enabled(self, marked: Real) -> None:
        """A mark is followed only when the mount's options enable it, as the kernel refuses a
        metacopy origin without ``metacopy=on``: a data map only with partial copy-up, a plain
        metacopy mark unless ``-o nometacopy``. :class:`metacopy.NoDataError` otherwise."""
        if marked.partial and not self.partial:
            raise metacopy.NoDataError("partial copy-up is off (nopartial_copyup), so its data "
                                       "map is not followed")
        if not marked.partial and not self.metacopy:
            raise metacopy.NoDataError("metacopy is off (nometacopy), so its mark is not "
                                       "followed")
