"""The work directory: where changes are built before they become visible, and the hard-link index
(the kernel's fs/overlayfs/super.c owns the same: work and index directories, feature probes and
the cleanup at mount).

Layout (docs/layer-format.md, section 4): ``WORK/tmp`` holds objects under construction and objects
on their way out; ``WORK/index`` holds the hard-link index. Nothing else in ``WORK`` is written.

The work directory is untrusted input like every layer: it is opened without following symlinks,
and it and its ``tmp/`` and ``index/`` must be real directories owned by the mounting user on the
upper's filesystem; anything else is refused before anything is deleted or created there.

Crash recovery happens here, at mount, before the filesystem serves its first request:

* everything in ``tmp/`` is removed: an object there was either not yet renamed into place (the
  change never happened) or already swapped out of place (the change is complete); a note there
  that a whiteout will hide nothing for a moment removes that whiteout if it is there;
* every index entry with a pending link-count change (see :mod:`cowfs.core.nlink`) is settled by
looking
  at the upper: the change it records either happened or it did not;
* index entries that no name uses any more are removed.

A read-only mount does none of this: it writes nothing (a crash's leftovers in ``tmp/`` are
invisible anyway, and pending link counts are settled when they are read).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import nlink, realfs, schema
from .errors import CowfsError

if TYPE_CHECKING:
    from .layers import LayerStack

log = logging.getLogger(__name__)

_SAFE_MODE_MASK = 0o022  # group- or world-writable work directories are refused
#: A note in ``WORK/tmp``: a whiteout at the path it holds hides nothing (see
#: :meth:`WorkDir.note_stray_whiteout`).
STRAY_SUFFIX = ".stray"


@dataclass(frozen=True, slots=True)
class Features:
    """What the upper's filesystem can do, probed once at mount in ``WORK/tmp``."""

    #: ``renameat2(RENAME_WHITEOUT)`` and 0/0 character-device whiteouts (Linux >= 5.8 lets a
    #: plain user make both). Without them, whiteouts are xattr-marked empty files.
    device_whiteouts: bool
    #: ``O_TMPFILE`` in the work directory.
    tmpfile: bool
    #: Reflinks (``FICLONE``): a copy-up of file data is then a clone. Probed once, so that a
    #: filesystem without them (ext4) is not asked again at every copy-up.
    reflink: bool = False


class WorkDir:
    """The opened work directory of one mount (or of an offline tool)."""

    def __init__(self, path: Path, fd: int | None, tmp_fd: int | None, index_fd: int | None,
                 lock_fd: int | None, features: Features) -> None:
        self.path = path
        self.fd = fd
        #: ``WORK/tmp``; None on a read-only mount whose work directory did not exist.
        self._tmp_fd = tmp_fd
        #: ``WORK/index``; None when there is none (read-only mount).
        self.index_fd = index_fd
        self.lock_fd = lock_fd
        self.features = features
        self._counter = itertools.count()

    @property
    def tmp_fd(self) -> int:
        if self._tmp_fd is None:
            raise OSError(errno.EROFS, "read-only mount: no work directory")
        return self._tmp_fd

    def temp_name(self) -> str:
        """A name in ``WORK/tmp`` that nothing else uses (pid and counter: unique per mount)."""
        return f"#{os.getpid()}.{next(self._counter)}"

    def discard(self, name: str) -> None:
        """Remove a temporary object once the change it belonged to is complete or abandoned.

        Failing here changes nothing that users see: the next mount removes what is left.
        """
        try:
            realfs.remove_tree(self.tmp_fd, name)
        except OSError as e:
            log.warning("cannot remove %r from the work directory (removed at the next mount): "
                        "%s", name, e.strerror)

    def note_stray_whiteout(self, path: tuple[str, ...]) -> str:
        """Record, before a change that leaves a whiteout hiding nothing at ``path`` (below the
        upper root) for a moment, that a whiteout found there after a crash is to be removed.
        Returns the note's name, to :meth:`discard` once the whiteout is gone."""
        name = self.temp_name() + STRAY_SUFFIX
        fd = realfs.create_file(self.tmp_fd, name, 0o600, os.O_WRONLY)
        try:
            os.write(fd, os.fsencode("/".join(path)))
        finally:
            os.close(fd)
        return name

    def close(self) -> None:
        for fd in (self.fd, self._tmp_fd, self.index_fd, self.lock_fd):
            if fd is not None:
                os.close(fd)

    # --- recovery at mount ------------------------------------------------------------------

    def clean_tmp(self, upper_root: int) -> None:
        """Remove what an interrupted change left in ``WORK/tmp`` (and the whiteouts that notes
        there say hide nothing)."""
        names = realfs.list_names(self.tmp_fd)
        for name in names:
            if name.endswith(STRAY_SUFFIX):
                self._remove_stray_whiteout(name, upper_root)
        for name in names:
            log.info("removing leftover %r from the work directory", name)
            realfs.remove_tree(self.tmp_fd, name)

    def _remove_stray_whiteout(self, note: str, upper_root: int) -> None:
        fd = realfs.open_path(self.tmp_fd, note)
        if fd is None:
            return
        try:
            with open(realfs.proc_path(fd), "rb") as f:
                path = tuple(os.fsdecode(f.read(4096)).split("/"))
        finally:
            os.close(fd)
        if any(part in ("", ".", "..") for part in path):
            return  # an empty note: the crash came before the change
        parent = realfs.open_parent(upper_root, path)
        if parent is None:
            return
        try:
            try:
                st = os.stat(path[-1], dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return
            if schema.is_device_whiteout(st.st_mode, st.st_rdev) or (
                    schema.may_be_xattr_whiteout(st.st_mode, st.st_size)
                    and _has_xattr(parent, path[-1], schema.XATTR_WHITEOUT)):
                log.info("removing a whiteout that hides nothing: %s", "/".join(path))
                realfs.unlink(parent, path[-1])
        finally:
            os.close(parent)

    def recover_index(self, upper_root: int) -> None:
        """Settle pending link counts and drop entries that no name uses any more."""
        if self.index_fd is None:
            return
        index_fd = self.index_fd
        for name in realfs.list_names(index_fd):
            fd = realfs.open_path(index_fd, name)
            if fd is None:
                continue
            try:
                self._recover_entry(index_fd, upper_root, name, fd)
            finally:
                os.close(fd)

    @staticmethod
    def _recover_entry(index_fd: int, upper_root: int, name: str, fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode) or schema.parse_index_name(name) is None:
            log.warning("ignoring %r in the hard-link index: not an index entry", name)
            return
        count = nlink.settle(fd, upper_root)
        if count is not None and count <= 0 and st.st_nlink == 1:
            log.info("removing index entry %r: no name uses it any more", name)
            realfs.unlink(index_fd, name)


def _has_xattr(dirfd: int, name: str, xattr: str) -> bool:
    fd = realfs.open_path(dirfd, name)
    if fd is None:
        return False
    try:
        return realfs.getxattr(fd, xattr) is not None
    finally:
        os.close(fd)


def recover(stack: LayerStack) -> None:
    """Finish or roll back what a crash interrupted (see the module docstring); at mount, before
    the first request, read-write mounts only."""
    stack.work.clean_tmp(stack.upper.root_fd)
    stack.work.recover_index(stack.upper.root_fd)


# --- opening ---------------------------------------------------------------------------------


def _check_private_dir(fd: int, path: Path, role: str, upper_dev: int) -> None:
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        raise CowfsError(f"{role} {str(path)!r} is not a directory")
    if st.st_uid != os.geteuid():
        raise CowfsError(f"{role} {str(path)!r} is owned by uid {st.st_uid}, not by the mounting "
                         f"user (uid {os.geteuid()}); refusing to use it")
    if st.st_mode & _SAFE_MODE_MASK:
        raise CowfsError(f"{role} {str(path)!r} is writable by other users (mode "
                         f"{stat.S_IMODE(st.st_mode):o}); refusing to use it")
    if st.st_dev != upper_dev:
        raise CowfsError(f"{role} {str(path)!r} is not on the same filesystem as the upper "
                         "directory (copy-up renames between them)")


def _open_child_dir(dirfd: int, name: str, path: Path, role: str, *, create: bool,
                    upper_dev: int) -> int | None:
    """Open ``name`` in ``dirfd`` as a directory, never following a symlink; create it (0700)
    when asked and missing. None when missing and not created."""
    if create:
        with contextlib.suppress(FileExistsError):
            realfs.mkdir(dirfd, name, 0o700)
    try:
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dirfd)
    except FileNotFoundError:
        if create:
            raise CowfsError(f"{role} {str(path)!r} vanished while it was being set up") from None
        return None
    except OSError as e:
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise CowfsError(f"{role} {str(path)!r} is not a directory (a symlink or a file); "
                             "refusing to use it") from None
        raise CowfsError(f"cannot open {role} {str(path)!r}: {e.strerror}") from None
    try:
        _check_private_dir(fd, path, role, upper_dev)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_given_work(path: Path, upper_dev: int) -> int:
    """A ``--work DIR`` named by the user: its path was resolved by the user's intent; the
    directory itself must still be a real, private directory."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CowfsError(f"work directory {str(path)!r} does not exist") from None
    except OSError as e:
        raise CowfsError(f"cannot use work directory {str(path)!r}: {e.strerror}") from None
    try:
        _check_private_dir(fd, path, "work directory", upper_dev)
    except BaseException:
        os.close(fd)
        raise
    return fd


def mark_work(fd: int, path: Path, upper_fd: int, *, read_only: bool, relocate: bool) -> None:
    """Mark a ``--work`` directory as the upper's (:data:`~cowfs.core.schema.XATTR_WORK_UPPER`): the
    offline commands read and empty only a recorded work directory that carries its upper's mark.
    One marked for another upper is refused (its index describes that upper), unless
    ``relocate`` (the upper was copied or moved, with its work directory)."""
    ust = os.fstat(upper_fd)
    wanted = schema.format_work_upper(ust.st_dev, ust.st_ino)
    found = realfs.getxattr(fd, schema.XATTR_WORK_UPPER)
    if found == wanted or (read_only and found is None):
        return
    if found is not None and not relocate:
        raise CowfsError(f"work directory {str(path)!r} belongs to another upper directory (its "
                         f"{schema.XATTR_WORK_UPPER} is {found.decode(errors='replace')!r}); give "
                         "that upper's work directory, or a new empty one (-o relocate: the upper "
                         "was moved with it)")
    if read_only:
        return
    try:
        realfs.setxattr(fd, schema.XATTR_WORK_UPPER, wanted)
    except OSError as e:
        raise CowfsError(f"cannot mark work directory {str(path)!r} as the upper's: "
                         f"{e.strerror}") from None


def lock_directory(fd: int, path: Path, role: str) -> int:
    """Lock a directory (the upper, the work directory) for as long as the returned descriptor is
    open (in the daemon): two mounts sharing either would corrupt each other, and each mount
    cleans its work directory's leftovers."""
    lock_fd = realfs.open_dir(fd)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise CowfsError(f"{role} {str(path)!r} is in use by another cowfs mount "
                         "(an upper can be mounted only once at a time)") from None
    return lock_fd


def open_work(upper_fd: int, upper_path: Path, given: Path | None, *,
              read_only: bool, relocate: bool = False) -> WorkDir:
    """Open (read-write: create) the work directory of an upper and check it.

    ``given`` is ``--work DIR``, or None for the default ``UPPER/.cowfs-work``, which is reached
    from the upper's descriptor without following a symlink. A given one is marked as this
    upper's (:func:`mark_work`).
    """
    upper_dev = os.fstat(upper_fd).st_dev
    if given is None:
        path = schema.default_work_dir(upper_path)
        fd = _open_child_dir(upper_fd, schema.WORK_DIR_NAME, path, "work directory",
                             create=not read_only, upper_dev=upper_dev)
    else:
        path = given
        fd = _open_given_work(given, upper_dev)
        try:
            mark_work(fd, path, upper_fd, read_only=read_only, relocate=relocate)
        except BaseException:
            os.close(fd)
            raise
    if fd is None:  # read-only, and never mounted read-write: nothing to read
        return WorkDir(path, None, None, None, None, Features(False, False))
    try:
        lock_fd = lock_directory(fd, path, "work directory")
        tmp_fd = _open_child_dir(fd, schema.WORK_TMP_NAME, path / schema.WORK_TMP_NAME,
                                 "work directory", create=not read_only, upper_dev=upper_dev)
        index_fd = _open_child_dir(fd, schema.WORK_INDEX_NAME, path / schema.WORK_INDEX_NAME,
                                   "hard-link index", create=not read_only, upper_dev=upper_dev)
    except BaseException:
        os.close(fd)
        raise
    features = probe_features(tmp_fd) if tmp_fd is not None and not read_only else (
        Features(False, False, False))
    return WorkDir(path, fd, tmp_fd, index_fd, lock_fd, features)


# --- feature probes ----------------------------------------------------------------------------


def probe_features(tmp_fd: int) -> Features:
    """Try, in ``WORK/tmp``, what the upper's filesystem supports (cleaned up at once)."""
    return Features(_probe_device_whiteouts(tmp_fd), _probe_tmpfile(tmp_fd),
                    _probe_reflink(tmp_fd))


def _probe_device_whiteouts(tmp_fd: int) -> bool:
    probe = f"#probe.{os.getpid()}"
    moved = probe + ".w"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=tmp_fd))
    except OSError:
        return False
    try:
        realfs.rename(tmp_fd, probe, tmp_fd, moved, realfs.RENAME_WHITEOUT)
    except OSError as e:
        log.info("no RENAME_WHITEOUT on the upper's filesystem (%s): xattr whiteouts", e.strerror)
        with contextlib.suppress(OSError):
            os.unlink(probe, dir_fd=tmp_fd)
        return False
    for name in (probe, moved):
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=tmp_fd)
    return True


def _probe_reflink(tmp_fd: int) -> bool:
    probe = f"#probe.{os.getpid()}.r"
    try:
        src = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=tmp_fd)
    except OSError:
        try:
            src = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=tmp_fd)
        except OSError:
            return False
        os.unlink(probe, dir_fd=tmp_fd)
    try:
        os.write(src, b"cowfs")
        dst = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=tmp_fd)
    except OSError:
        os.close(src)
        return False
    try:
        return realfs.can_clone(src, dst)
    finally:
        os.close(src)
        os.close(dst)


def _probe_tmpfile(tmp_fd: int) -> bool:
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=tmp_fd)
    except OSError:
        return False
    os.close(fd)
    return True

