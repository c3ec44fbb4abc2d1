"""Copy-up: promoting a lower object into the upper layer (the kernel's fs/overlayfs/copy_up.c).

The copy is built in the work directory — data first, then xattrs (writing data after xattrs would
drop ``security.capability``), then owner, mode and times (each step would undo what follows it),
then fsync if data was copied (the rest is metadata, which the filesystem's journal commits in
order; so is a whole clone, as in the kernel) — and renamed into place with one
``renameat2(RENAME_NOREPLACE)``, parents first. A crash therefore never leaves a half-copied object
visible, and a step that fails leaves nothing but a temporary object, which is removed at once (or
at the next mount).

Data is copied by the kernel (:func:`cowfs.core.realfs.copy_data`): a reflink where the upper
supports it, else ``copy_file_range`` over the data segments only (holes stay holes). It never
passes through Python buffers. Callers run a copy-up that copies much data in a worker thread
(:mod:`cowfs.core.inline`); the per-inode lock makes concurrent openers share one copy-up.

A metadata change or a new name of a lower regular file copies it without its data
(:attr:`Need.METADATA`, :mod:`cowfs.core.metacopy`); the first write or truncation gives it its
data, in place (renaming nothing: a concurrent rename cannot make the fill land on another name),
which
:mod:`cowfs.daemon.upperdata` does: what happens to a copy's data after the copy exists is its own.
A large lower regular file opened for writing or truncated is copied up as a *partial* file
(:mod:`cowfs.core.partial`): a metacopy file with a data map, into which writes copy only the blocks
they touch; where a clone is as cheap (reflinks, one filesystem), it is cloned whole instead.

A lower non-directory with several names (hard links) is copied once, into the hard-link index
(``WORK/index/<layer>-<inode>``), and not linked to any name: a lookup of any of its names finds
the entry (:mod:`cowfs.daemon.namei`), so the names stay one file, also across mounts. A name is
linked to the entry only when it has to exist in the upper (it is renamed: see
:mod:`cowfs.daemon.namespace`); :mod:`cowfs.core.nlink` keeps the entry's link count.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time

from ..core import metacopy, nlink, origins, realfs, schema
from ..core.layers import Layer
from ..core.resolve import Data, Real
from ..core.workdir import WorkDir
from . import upperdata
from .inodes import Inode
from .namei import Namei
from .upperdata import Need, UpperData

log = logging.getLogger(__name__)


def copy_xattrs(src: Real, dst_fd: int, *, opened: bool = False) -> None:
    """Copy the user's xattrs (never the layer's own metadata) onto ``dst_fd`` (``opened``: open
    for I/O, not ``O_PATH``)."""
    for name in realfs.listxattr(src.fd):
        if not schema.is_copied_on_copy_up(name):
            continue
        value = realfs.getxattr(src.fd, name)
        if value is None:
            continue
        try:
            realfs.setxattr(dst_fd, name, value, opened=opened)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP):
                raise
            log.warning("copy-up: cannot copy xattr %s: %s", name, e.strerror)


def copy_attributes(st: os.stat_result, fd: int, mtime_ns: int | None = None, *,
                    opened: bool = False) -> None:
    """Owner before mode (chown clears set-id bits), times last (everything else changes them).
    A daemon that is not root cannot give objects away: they stay its own, as its files are.
    ``mtime_ns``: instead of ``st``'s. ``opened``: ``fd`` is open for I/O, not ``O_PATH``."""
    if os.geteuid() == 0:
        realfs.chown(fd, st.st_uid, st.st_gid, opened=opened)
    if not stat.S_ISLNK(st.st_mode):
        realfs.chmod(fd, stat.S_IMODE(st.st_mode), opened=opened)
    realfs.utimens(fd, st.st_atime_ns, st.st_mtime_ns if mtime_ns is None else mtime_ns,
                   opened=opened)


def _truncated_mtime(with_data: bool) -> int | None:
    """The mtime of a copy made without data because the file is being truncated to 0: the
    truncation's (now), so that the copy in place already shows what the truncation will."""
    return None if with_data else time.time_ns()


def _origin_xattrs(lower: Real, st: os.stat_result) -> dict[str, bytes]:
    """What an upper copy records about its origin, so that it keeps its inode number: with the
    lower path, by which the origin is verified after the copy is renamed (cowfs.core.origins).
    None on a layer whose numbers may change at its next mount (:attr:`Layer.numbers_last`)."""
    if not lower.layer.numbers_last:
        return {}
    value = schema.format_origin(lower.layer.index, st.st_ino, origins.lower_path(lower))
    return {schema.origin_xattr(st.st_mode): value}


class CopyUp:
    """Copies objects up; one instance per mount."""

    def __init__(self, upper: Layer, work: WorkDir, namei: Namei, *, sync: bool = True,
                 metacopy: bool = True, partial_min: int = 0) -> None:
        self.upper = upper
        self.work = work
        self.sync = sync
        #: Lookup, which names the index entries made here (:meth:`Namei.index_entry_ref`).
        self.namei = namei
        #: Whether metadata changes may copy up without data (``-o nometacopy``: never).
        self.metacopy = metacopy
        #: Regular files of at least this size copy up only the blocks written (0: never).
        self.partial_min = partial_min
        #: The upper directory's owner: a metacopy file must be its or its lower file's.
        self.trusted_uid = namei.trusted_uid
        #: What happens to a copy's data after the copy exists (:mod:`cowfs.daemon.upperdata`).
        self.data = UpperData(work, sync=sync)

    @staticmethod
    def is_hard_linked_lower(inode: Inode) -> bool:
        """A lower non-directory with several names: copied up through the index."""
        return (not inode.is_dir and inode.upper is None and inode.top.nlink > 1
                and inode.top.layer.numbers_last)

    def ensure(self, inode: Inode, need: Need = Need.WRITE) -> Real:
        """The upper copy of ``inode``, copying it (and its parents) up first if needed, with
        the data ``need`` says (:class:`Need`); a copy that has less is given it (in place)."""
        metadata_only = need is Need.METADATA
        with_data = need is not Need.EMPTY
        whole = need is Need.WHOLE
        upper = inode.upper
        if upper is not None and (metadata_only or not upper.metacopy or (
                upper.partial and with_data and not whole)):
            return upper
        with inode.copy_up_lock:
            upper = inode.upper
            if upper is not None:
                if metadata_only or not upper.metacopy:
                    return upper
                return self.data.give(inode, upper, need,
                                      lambda: self._may_copy_partly(inode.data))
            if self.is_hard_linked_lower(inode):
                real = self._index_entry(inode)
            else:
                link = inode.any_link()
                if link is None:
                    raise OSError(errno.ESTALE, "object has no name left to copy up to")
                parent, name = link
                parent_upper = self.ensure(parent)
                meta = metadata_only and self._may_skip_data(inode)
                # A metadata change copies no data only with metacopy; a write, or a truncation,
                # copies the blocks it touches of a large file.
                part = (not metadata_only and with_data and not whole
                        and self._may_copy_partly(inode.top) and self._owner_kept(inode))
                real = self._copy_up(inode, parent_upper, name,
                                     with_data and not meta and not part, meta, part)
            kept = inode.push_upper(real)
            self.data.copied_up(inode)  # a lower partial file's data: reads go to the copy now
            return kept

    # --- partial files (cowfs.core.partial)
    # ---------------------------------------------------------

    def _may_copy_partly(self, data: Real) -> bool:
        """Whether a copy-up for writing may copy only the blocks written: a large lower regular
        file, unless the upper can clone it (as cheap, and an ordinary file after)."""
        if not self.partial_min or not stat.S_ISREG(data.mode) or data.layer.is_upper or (
                data.partial):  # a lower partial file: copied whole (origins never chain)
            return False
        if not data.layer.numbers_last:  # no origin would find the rest of the data again
            return False
        st = data.stat()
        if st.st_size < self.partial_min:
            return False
        same_fs = st.st_dev == os.fstat(self.upper.root_fd).st_dev
        return not (self.work.features.reflink and same_fs)

    def _may_skip_data(self, inode: Inode) -> bool:
        """Whether a copy-up for a metadata change may leave the data in the lower file."""
        top = inode.top
        if not (self.metacopy and stat.S_ISREG(top.mode) and top.stat().st_size > 0):
            return False
        if top.partial:  # a lower partial file's own blocks must come up: copied whole
            return False
        if not top.layer.numbers_last:  # no origin would find the data again
            return False
        return self._owner_kept(inode)

    def _owner_kept(self, inode: Inode) -> bool:
        """Whether a copy without (all) its data may keep the lower file's owner and leave its
        data below: when the data may stay there (:meth:`_may_leave_data`), and for a metacopy
        file of a lower layer, when the rule allows its owner over its data file in this upper
        too (the lower's was checked against its own layer's root)."""
        top = inode.top
        if not self._may_leave_data(self._data_source(inode)):
            return False
        if not top.metacopy:
            return True
        return metacopy.owner_allowed(top.stat().st_uid, inode.data.stat().st_uid,
                                      self.trusted_uid)

    def _may_leave_data(self, data: Real) -> bool:
        """Whether a copy in this upper may leave its data in the lower file ``data``, which the
        next lookup finds by walking the origin's path: the origin must record the path itself
        (not a long path's digest), and the upper's owner, if not the daemon's user, must be able
        to read the file (:func:`metacopy.readable_by`), or the next lookup refuses the mark."""
        path = origins.lower_path(data)
        if path is None or not schema.origin_path_inline(path):
            return False
        return self.trusted_uid == os.geteuid() or metacopy.readable_by(
            self.trusted_uid, data.layer.root_fd, path)

    @staticmethod
    def _data_source(inode: Inode) -> Real:
        """What a copy-up of a lower ``inode`` copies the data of and names as its origin: its
        lower object, or for a metacopy file of a lower layer its data file (so that a metacopy
        copy finds its data directly: origins never chain). EIO when that has none."""
        top = inode.top
        return inode.data if top.metacopy else top

    def metadata_only_owner(self, inode: Inode, uid: int) -> bool:
        """Whether a ``chown`` to ``uid`` may leave (or make) the file a metacopy one: only to the
        owner of its lower file or of the upper directory (see :mod:`cowfs.core.metacopy`)."""
        upper = inode.upper
        if upper is not None and not upper.metacopy:
            return True
        try:
            lower_uid = inode.data.stat().st_uid
        except OSError:
            return False
        return metacopy.owner_allowed(uid, lower_uid, self.trusted_uid)

    def link_name(self, real: Real, parent: Real, name: str) -> None:
        """Give an index entry a name in the upper (parent times unchanged: this is a copy-up)."""
        parent_times = parent.stat()
        realfs.link(real.fd, parent.fd, name)
        self._restore_times(parent, parent_times)

    def _index_entry(self, inode: Inode) -> Real:
        lower = inode.top
        st = lower.stat()
        entry = schema.index_name(lower.layer.index, st.st_ino)
        index_fd = self.work.index_fd
        if index_fd is None:
            raise OSError(errno.EROFS, "read-only mount")
        fd = realfs.open_path(index_fd, entry)
        if fd is None:
            temp = self.work.temp_name()
            source = self._data_source(inode)
            extra = {**_origin_xattrs(source, source.stat()), **nlink.initial(st.st_nlink)}
            fd = self._build(lower, st, temp, with_data=True, extra=extra, data=source)
            try:
                realfs.rename(self.work.tmp_fd, temp, index_fd, entry, realfs.RENAME_NOREPLACE)
            except BaseException:
                os.close(fd)
                self.work.discard(temp)
                raise
        try:
            at = self.namei.index_entry_ref(entry, fd)
        except BaseException:
            os.close(fd)
            raise
        return Real(self.upper, fd, st.st_mode, indexed=True, at=at)

    def _copy_up(self, inode: Inode, parent: Real, name: str, with_data: bool,
                 meta: bool = False, part: bool = False) -> Real:
        """``meta``: without data; ``part``: without data, as a partial file."""
        lower = inode.top
        st = lower.stat()
        source = self._data_source(inode)
        temp = self.work.temp_name()
        log.debug("copy-up %r -> %s (data=%s, metacopy=%s, partial=%s)", inode, name, with_data,
                  meta, part)
        extra = _origin_xattrs(source, st if source is lower else source.stat())
        if meta or part:
            extra[schema.XATTR_METACOPY] = b""
        if part:
            extra[schema.XATTR_DATAMAP] = upperdata.empty_map(st.st_size)
        fd = self._build(lower, st, temp, with_data, extra,
                         size=st.st_size if meta or part else 0, data=source)
        try:
            parent_times = parent.stat()
            realfs.rename(self.work.tmp_fd, temp, parent.fd, name, realfs.RENAME_NOREPLACE)
        except BaseException:
            os.close(fd)
            self.work.discard(temp)
            raise
        self._restore_times(parent, parent_times)
        data = Data.PARTIAL if part else Data.LOWER if meta else Data.OWN
        try:
            at = parent.named(name, os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        return Real(self.upper, fd, st.st_mode, data=data, at=at)

    @staticmethod
    def _restore_times(parent: Real, times: os.stat_result) -> None:
        """Copy-up is not a change of the parent as far as users can see. Best effort: the copy-up
        itself is complete, and failing it now would leave a complete change reported as failed."""
        try:
            realfs.utimens(parent.fd, times.st_atime_ns, times.st_mtime_ns)
        except OSError as e:
            log.warning("copy-up: cannot restore the parent's times: %s", e.strerror)

    def _build(self, lower: Real, st: os.stat_result, temp: str, with_data: bool,
               extra: dict[str, bytes], size: int = 0, data: Real | None = None) -> int:
        """Build the copy at ``temp`` in the work dir; return an O_PATH descriptor for it.
        ``data``: where a regular file's data is, if not in ``lower`` (a lower metacopy file)."""
        wfd = self.work.tmp_fd
        kind = stat.S_IFMT(st.st_mode)
        try:
            if kind == stat.S_IFREG:
                self._build_file(lower, st, temp, with_data, extra, size, data or lower)
            elif kind == stat.S_IFDIR:
                realfs.mkdir(wfd, temp, 0o700)
            elif kind == stat.S_IFLNK:
                realfs.symlink(wfd, temp, realfs.readlink(lower.fd))
            else:
                realfs.mknod(wfd, temp, st.st_mode, st.st_rdev)
            fd = realfs.open_path(wfd, temp)
            if fd is None:
                raise OSError(errno.ENOENT, "copy-up object vanished from the work directory")
        except BaseException:
            self.work.discard(temp)
            raise
        try:
            if kind != stat.S_IFREG:
                self._finish(lower, st, fd, extra)
        except BaseException:
            os.close(fd)
            self.work.discard(temp)
            raise
        return fd

    @staticmethod
    def _finish(lower: Real, st: os.stat_result, fd: int, extra: dict[str, bytes],
                mtime_ns: int | None = None, *, opened: bool = False) -> None:
        """xattrs, then owner and mode, then times: each step would undo what follows it.
        ``opened``: ``fd`` is open for I/O (a regular file being built), not ``O_PATH``."""
        copy_xattrs(lower, fd, opened=opened)
        for name, value in extra.items():
            try:
                realfs.setxattr(fd, name, value, opened=opened)
            except PermissionError:
                if name.startswith(schema.COWFS_PREFIX) or name == schema.XATTR_METACOPY:
                    raise  # user.* on a file or directory: must work (checked at mount)
                # trusted.* needs CAP_SYS_ADMIN: without it, a copied-up symlink or special file
                # gets a new inode number (a known limit of unprivileged mounts).
                log.debug("cannot record %s (not privileged)", name)
        copy_attributes(st, fd, mtime_ns, opened=opened)

    def _copy_data(self, source_fd: int, source_st: os.stat_result, dst: int,
                   size: int) -> bool:
        """Copy ``size`` bytes of the file behind ``source_fd`` (an ``O_PATH`` descriptor) into
        ``dst``, without changing its access time where permitted. Returns whether the data was
        cloned whole (:func:`cowfs.core.realfs.copy_data`)."""
        flags = os.O_RDONLY | (os.O_NOATIME if _may_noatime(source_st) else 0)
        src = realfs.reopen(source_fd, flags)
        try:
            return realfs.copy_data(src, dst, size, reflink=self.work.features.reflink)
        finally:
            os.close(src)

    def _copy_partial(self, lower: Real, st: os.stat_result, data: Real, dst: int) -> None:
        """The full content of a partial file of a lower layer (an older upper): its own blocks,
        then the rest from its data file (:func:`upperdata.lower_rest`)."""
        fill_rest = upperdata.lower_rest(lower, data)
        self._copy_data(lower.fd, st, dst, st.st_size)
        fill_rest(dst, st.st_size)

    def _build_file(self, lower: Real, st: os.stat_result, temp: str, with_data: bool,
                    extra: dict[str, bytes], size: int, data: Real) -> None:
        """Called with ``temp`` not existing; on failure the caller discards it. ``size``: of a
        metacopy file (sparse: its data stays in the lower file)."""
        dst = realfs.create_file(self.work.tmp_fd, temp, 0o600, os.O_WRONLY)
        try:
            if size:
                realfs.ftruncate(dst, size)
            copied = False  # data written into the copy, not cloned
            if with_data and st.st_size and lower.partial:
                self._copy_partial(lower, st, data, dst)
                copied = True
            elif with_data and st.st_size:
                copied = not self._copy_data(data.fd, st if data is lower else data.stat(), dst,
                                             st.st_size)
            self._finish(lower, st, dst, extra, _truncated_mtime(with_data or bool(size)),
                         opened=True)
            if self.sync and copied:
                # Copied data, and only that, needs it (as in the kernel's ovl_copy_up_file): the
                # rest of the copy (its size, xattrs, owner, mode, times) is metadata, which a
                # journaling filesystem commits in order, before the rename that makes the copy
                # visible. So a metacopy or partial file (no data), an empty file and a whole
                # clone (a reflink: metadata too) skip it.
                realfs.fsync(dst)
        finally:
            os.close(dst)


def _may_noatime(st: os.stat_result) -> bool:
    """``O_NOATIME`` is allowed to the file's owner and to root: reading a lower file to copy it
    must not change its access time (the lower layers are never modified)."""
    uid = os.geteuid()
    return uid == 0 or uid == st.st_uid
