"""Metadata-only copy-up: upper files whose data is still the lower file's (the kernel's metacopy).

Changing a lower regular file's metadata (``chmod``, ``chown``, times, xattrs) or its name
(``link``, ``rename``) copies no data: the upper copy is a sparse file of the lower file's size,
with the metadata, the origin (``user.cowfs.origin``) and the mark ``user.overlay.metacopy`` (an
empty value). While the mark is there, the file's data is the lower file the origin names, found by
walking the origin's path in its layer (:func:`find_data`), whatever the upper file holds. The
first open for writing or truncation gives it its data, in place, as the kernel does
(:func:`fill`): the data is written into the copy and the mark removed last, the commit point (a
crash before it leaves the data coming from the lower). Nothing is renamed, so a concurrent rename
of the file cannot make the fill land on another name, and a linked copy's names stay one file.

The mark is untrusted input, and it gives access to a lower file's data under the upper file's
owner and mode. So it is honoured only when the upper file's owner is the lower file's owner or the
owner of the upper directory: a user who can write files into the upper directly (an upper
directory created through an ``allow_other`` mount) cannot mark a file of their own to read a lower
file that is not theirs. And when the layer holding the mark is owned by someone else than the
daemon's user (root serving a user's upper), that owner must be able to read the data file by its
mode bits and those of the directories on its path (:func:`readable_by`): the owner of the layer
can write any mark into it, and must not read through one what they could not read anyway. The
origin must also lead to a regular file of the same size with the recorded inode number. The
mount follows marks at all only when its options enable them (:mod:`cowfs.daemon.copyup`).

Known limits: filling in place drops ``security.capability`` and, for a daemon without
``CAP_FSETID``, set-ID bits (the kernel does so on every write); they are restored before the mark
is removed, so a crash in between leaves the file without them while its data still comes from the
lower. A daemon that is not root and owns a read-only upper file makes it writable for the
duration of the fill.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import pwd
import stat
import time

from . import partial, realfs, schema
from .dirstack import entries
from .resolve import Found, Real, probe_path

log = logging.getLogger(__name__)


class NoDataError(OSError):
    """A metacopy file whose data cannot be found or may not be used: reads fail with ``EIO``.
    ``reason`` says why, for the mount's log and ``cowfs check``."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, "metacopy file without data")
        self.reason = reason


def is_marked(fd: int) -> bool:
    """Whether an upper regular file carries the metacopy mark."""
    return realfs.getxattr(fd, schema.XATTR_METACOPY) is not None


def find_data(upper_fd: int, roots: tuple[Real, ...], trusted_uid: int, *,
              layer_index: int = 0) -> Real:
    """The regular file whose data a marked file shows, as a new ``O_PATH`` real (the caller
    closes it). ``roots`` are the layer roots by index, the upper's first; ``layer_index`` the
    index of the marked file's layer, and ``trusted_uid`` the owner of that layer's root. The
    origin's layer counts from there (it was written by a mount whose upper this layer was).
    A marked file of a lower layer whose data is not at that index (the stack below it is not
    the one it was written over) is looked for at the origin's path in the other layers below
    it. :class:`NoDataError` when there is none."""
    value = realfs.getxattr(upper_fd, schema.XATTR_ORIGIN)
    if value is None:
        raise NoDataError("it has no origin")
    try:
        origin = schema.parse_origin(value)
    except ValueError as e:
        raise NoDataError(str(e)) from None
    if origin.path is None:
        raise NoDataError("its origin records only a digest of its path" if origin.digest
                          else "its origin has no path")
    candidates = data_layers(layer_index, origin.layer, len(roots))
    if not candidates:
        raise NoDataError(f"its origin names layer {origin.layer}, not a lower layer here")
    marked = os.fstat(upper_fd)
    size = _data_size(upper_fd, marked.st_size)
    first: NoDataError | None = None
    for index in candidates:
        try:
            return _data_at(roots, index, origin.path, origin, marked, size, trusted_uid)
        except NoDataError as e:
            first = first or e
    raise first or NoDataError("no layer to look in")


def data_layers(layer_index: int, origin_layer: int, count: int) -> list[int]:
    """Where a marked file of layer ``layer_index`` whose origin names ``origin_layer`` may have
    its data, in the order looked at, in a stack of ``count`` layers: the origin's layer counted
    from the marked file's, then (for a marked file of a lower layer) every other layer below it,
    topmost first. An upper's stack is the one its origins were written over (the stack record
    says so); a lower's need not be."""
    target = layer_index + origin_layer
    first = [target] if origin_layer > 0 and target < count else []
    if layer_index == 0:
        return first
    return first + [i for i in range(layer_index + 1, count) if i != target]


def rebind(upper_fd: int, roots: tuple[Real, ...], trusted_uid: int) -> int:
    """After the lower layers were moved or copied on purpose (``-o relocate``, ``commit
    --relocate``): give every metacopy (and partial) file of the upper whose data file is no
    longer found by its origin's inode number the inode number of the file now at its origin's
    path, if that file passes every other rule (regular, not marked, its size, the trust rule).
    The user's word that the layers are the same content replaces the inode number's. Returns
    how many origins were rewritten. ``upper_fd``: the upper's root (``O_PATH``)."""
    rebound = 0
    # Any depth, with a bounded number of open directories (cowfs.core.dirstack).
    for _, dirfd, name, st in entries(upper_fd, skip=lambda path: path == schema.WORK_DIR_NAME):
        if not (stat.S_ISREG(st.st_mode) and st.st_size > 0):
            continue
        fd = realfs.open_path(dirfd, name)
        if fd is None:
            continue
        try:
            if is_marked(fd):
                rebound += _rebind_one(fd, roots, trusted_uid)
        finally:
            os.close(fd)
    return rebound


def _rebind_one(fd: int, roots: tuple[Real, ...], trusted_uid: int) -> int:
    try:
        os.close(find_data(fd, roots, trusted_uid).fd)
        return 0
    except NoDataError:
        pass
    value = realfs.getxattr(fd, schema.XATTR_ORIGIN)
    try:
        origin = schema.parse_origin(value or b"")
        if origin.path is None:
            return 0
        size = _data_size(fd, os.fstat(fd).st_size)
        found = _data_at(roots, origin.layer, origin.path, origin, os.fstat(fd), size,
                         trusted_uid, any_ino=True)
    except (ValueError, NoDataError):
        return 0
    try:
        ino = os.fstat(found.fd).st_ino
    finally:
        os.close(found.fd)
    realfs.setxattr(fd, schema.XATTR_ORIGIN, schema.format_origin(origin.layer, ino, origin.path))
    log.info("relocated: origin of a metacopy file rebound to %s in layer %d (inode %d)",
             "/" + "/".join(origin.path), origin.layer, ino)
    return 1


def _data_at(roots: tuple[Real, ...], index: int, components: tuple[str, ...],
             origin: schema.Origin, marked: os.stat_result, size: int, trusted_uid: int, *,
             any_ino: bool = False) -> Real:
    """The data file at the origin's path (``components``) in layer ``index``, if it passes the
    rules (``size``: the one it must have; ``any_ino``: of whatever inode number, see
    :func:`rebind`)."""
    path = "/" + "/".join(components)
    where = f"{path} in layer {index}"
    if not 0 < index < len(roots):
        raise NoDataError(f"there is no layer {index} for {path}")
    try:
        found = probe_path(roots[index], components)
    except OSError as e:  # a refused redirect on the way
        raise NoDataError(f"cannot walk {path} in layer {index}: {e.strerror}") from None
    if not isinstance(found, Found):
        raise NoDataError(f"layer {index} has no file at {path}")
    real = found.obj
    try:
        lower = os.fstat(real.fd)
        if not stat.S_ISREG(lower.st_mode) or (lower.st_ino != origin.ino and not any_ino):
            raise NoDataError(f"{where} is not regular file {origin.ino}")
        if real.metacopy:
            raise NoDataError(f"{where} is a metacopy file itself")
        if lower.st_size != size:
            raise NoDataError(f"{where} has {lower.st_size} bytes, the marked file's data "
                              f"{size}")
        if marked.st_uid not in (lower.st_uid, trusted_uid):
            raise NoDataError(f"its owner {marked.st_uid} owns neither {where} nor the root "
                              "of its own layer")
        if trusted_uid != os.geteuid() and not readable_by(trusted_uid, roots[index].fd,
                                                           components):
            raise NoDataError(f"user {trusted_uid}, who owns the marked file's layer, may not "
                              f"read {where}")
    except BaseException:
        os.close(real.fd)
        raise
    return real


def _data_size(upper_fd: int, upper_size: int) -> int:
    """The size a marked file's data file must have: the file's own, or for a partial file
    (:mod:`cowfs.core.partial`) the one its data map records."""
    value = realfs.getxattr(upper_fd, schema.XATTR_DATAMAP)
    if value is None:
        return upper_size
    try:
        return partial.DataMap.decode(value).lower_size
    except ValueError as e:
        raise NoDataError(f"its data map is malformed: {e}") from None


def readable_by(uid: int, root_fd: int, components: tuple[str, ...]) -> bool:
    """Whether user ``uid`` may read the file at ``components`` below the directory ``root_fd``
    by the mode bits alone: search on that directory and on each one on the way, read on the
    file (the owner of an object may, whatever its bits: they could change them). Never
    following a symlink; False when the path does not lead to an object."""
    fd = os.dup(root_fd)
    try:
        for part in components:
            st = os.fstat(fd)
            if not (stat.S_ISDIR(st.st_mode) and _may(st, uid, 0o1)):
                return False
            child = realfs.open_path(fd, part)
            os.close(fd)
            fd = -1
            if child is None:
                return False
            fd = child
        return _may(os.fstat(fd), uid, 0o4)
    except OSError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)


def _may(st: os.stat_result, uid: int, bits: int) -> bool:
    """Whether ``uid`` has the permission ``bits`` (0o4 read, 0o1 search) on ``st`` by its mode:
    the owner's class, else the group's when ``uid`` is in the group, else the others'."""
    if uid in (0, st.st_uid):
        return True
    if st.st_gid in groups_of(uid):
        return bool(st.st_mode >> 3 & bits)
    return bool(st.st_mode & bits)


@functools.cache
def groups_of(uid: int) -> frozenset[int]:
    """The groups of user ``uid`` (primary and supplementary); none for a uid without a name."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return frozenset()
    return frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))


def owner_allowed(uid: int, lower_uid: int, trusted_uid: int) -> bool:
    """Whether a marked file may have owner ``uid`` (see the module docstring): a ``chown`` to
    anyone else fills the data first."""
    return uid in (lower_uid, trusted_uid)


def fill(upper_fd: int, data_fd: int, *, with_data: bool, sync: bool, reflink: bool) -> None:
    """Give a marked upper file its own data, in place, and remove the mark (the commit point).

    ``with_data`` False empties it instead (it is about to be truncated to 0: its mtime becomes
    the truncation's, as the truncation will make it). Owner, mode, times and
    ``security.capability`` are as before. A step that fails before the commit point is undone
    as far as it can be (size, mode and times back: the file stays a metacopy file whose sparse
    content is never read), so a failed request leaves the file as it was; a crash before the
    commit point can leave the mtime of the crash (layer-format.md 11a).
    """
    st = os.fstat(upper_fd)
    caps = realfs.getxattr(upper_fd, partial.CAPABILITY)
    made_writable = False
    try:
        dst = realfs.reopen(upper_fd, os.O_WRONLY)
    except PermissionError:
        if st.st_uid != os.geteuid():
            raise
        realfs.chmod(upper_fd, stat.S_IMODE(st.st_mode) | stat.S_IWUSR)
        made_writable = True
        dst = realfs.reopen(upper_fd, os.O_WRONLY)
    try:
        try:
            cloned = False
            if with_data:
                src = realfs.reopen(data_fd, os.O_RDONLY | _noatime(os.fstat(data_fd)))
                try:
                    cloned = realfs.copy_data(src, dst, st.st_size, reflink=reflink)
                finally:
                    os.close(src)
            else:
                realfs.ftruncate(dst, 0)
            if sync and not cloned:  # a whole clone is metadata (realfs.copy_data)
                realfs.fsync(dst)
            # Emptied: the mtime of the truncation to come (copyup's _truncated_mtime).
            partial.restore_after_fill(upper_fd, st, caps, chmod=made_writable,
                                       mtime_ns=None if with_data else time.time_ns())
            realfs.removexattr(upper_fd, schema.XATTR_METACOPY)
        except BaseException:
            _undo_fill(upper_fd, dst, st, caps, with_data=with_data)
            raise
    finally:
        os.close(dst)
    log.debug("metacopy filled fd=%d (data=%s)", upper_fd, with_data)


def _undo_fill(upper_fd: int, dst: int, before: os.stat_result, caps: bytes | None, *,
               with_data: bool) -> None:
    """After a failed fill, before the commit point: the marked file as it was (best effort,
    logged: the first failure is what the caller reports). Data written into it is harmless (a
    marked file's content is never read); an emptied one gets its size back (a sparse file)."""
    try:
        if not with_data:
            realfs.ftruncate(dst, before.st_size)
        partial.restore_after_fill(upper_fd, before, caps, chmod=True)
    except OSError as e:
        log.warning("metacopy: cannot undo a failed fill of fd=%d: %s", upper_fd, e.strerror)


def _noatime(st: os.stat_result) -> int:
    """``O_NOATIME`` where allowed (owner or root): reading the lower must not change it."""
    uid = os.geteuid()
    return os.O_NOATIME if uid in (0, st.st_uid) else 0
