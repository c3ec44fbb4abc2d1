"""Thin wrappers around the system calls cowfs makes on the real layers.

Every object is reached relative to a directory file descriptor with ``O_NOFOLLOW``; no layer path
is ever resolved as a string, so a symlink inside a layer can never lead cowfs outside its layers.
Objects are held as ``O_PATH`` descriptors; operations that need a path (xattrs, chmod, utimes) use
the ``/proc/self/fd/N`` magic link, which names the object itself and follows nothing further (a
descriptor opened for I/O, as a copy-up's new file, is passed as it is: ``opened=True``).

Every call that changes a layer is one syscall (``copy_bytes``: one copy) and one debug log line,
so that a debug log is a complete record of what cowfs did to the upper layer; nothing in cowfs
changes a layer except through this module (data written through open files aside).

Fault injection (tests only). Every wrapper that changes a layer carries the :func:`change`
decorator; a wrapper added later must carry it too, or the fault-injection tests
(tests/test_faults.py) cannot reach it. The decorator costs one ``if`` per change unless the
daemon was started with ``COWFS_FAULT`` in its environment; :func:`arm_faults_from_env`, called
once the mount is ready (after recovery at mount), reads it. From then on every change is counted
(1-based, across threads) and the variable says what happens to which one, as comma-separated
directives:

* ``N:kill-before`` / ``N:kill-after``: SIGKILL the daemon just before / just after the N-th
  change's syscall;
* ``N:ENOSPC`` (any errno name): the N-th change raises ``OSError(ENOSPC)`` instead of its
  syscall;
* ``count:FILE``: append ``<n> <wrapper> <args>`` to FILE for every change, flushed at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, ParamSpec, TypeVar

from . import dirstack, inline
from .errors import CowfsError
from .libc import fs_type, libc

log = logging.getLogger(__name__)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: Move the object and leave a 0/0 character-device whiteout at the old name, in one step.
RENAME_WHITEOUT = 4

#: The C library (:mod:`cowfs.core.libc`, the one handle cowfs has on it): the calls Python's os
#: module lacks. ``argtypes`` set here hold for every user of the handle.
_renameat2 = libc.renameat2
_syncfs = libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int

_fallocate = libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

_statx = libc.statx
_statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
_statx.restype = ctypes.c_int
_AT_EMPTY_PATH = 0x1000
#: ``STATX_ATTR_IMMUTABLE | STATX_ATTR_APPEND`` (the same bits as ``FS_IMMUTABLE_FL`` and
#: ``FS_APPEND_FL``).
PROTECTED = 0x10 | 0x20

_NO_XATTR = (errno.ENODATA, errno.ENOTSUP)

FICLONE = 0x40049409
_NO_REFLINK = (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF)
_NO_COPY_RANGE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def proc_path(fd: int) -> str:
    """A path naming exactly the object behind ``fd``, usable with path-only system calls."""
    return f"/proc/self/fd/{fd}"


def open_path(dirfd: int, name: str) -> int | None:
    """An ``O_PATH`` descriptor for ``name`` in ``dirfd`` (never following a symlink), or None."""
    try:
        return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return None


def open_parent(root_fd: int, components: tuple[str, ...]) -> int | None:
    """An ``O_PATH`` descriptor of the directory that holds ``components[-1]`` below ``root_fd``,
    reached one component at a time without following a symlink; None when something on the way
    is missing or not a directory. The caller closes it."""
    parent = os.dup(root_fd)
    for part in components[:-1]:
        child = open_path(parent, part)
        os.close(parent)
        if child is None:
            return None
        parent = child
        if not stat.S_ISDIR(os.fstat(parent).st_mode):
            os.close(parent)
            return None
    return parent


def open_dir(fd: int) -> int:
    """A readable descriptor for the directory behind an ``O_PATH`` descriptor (for listing)."""
    return os.open(proc_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def reopen(fd: int, flags: int) -> int:
    """Open the regular file behind an ``O_PATH`` descriptor for I/O.

    No ``O_NOFOLLOW``: the magic link must be followed, and it leads to the object itself.
    """
    return os.open(proc_path(fd), flags | os.O_CLOEXEC)


def reopen_noatime(fd: int, flags: int) -> int:
    """:func:`reopen` with ``O_NOATIME`` (reads leave the access time alone), which only the
    file's owner or a holder of CAP_FOWNER may ask for; anyone else opens without it."""
    try:
        return os.open(proc_path(fd), flags | os.O_NOATIME | os.O_CLOEXEC)
    except PermissionError:
        return os.open(proc_path(fd), flags | os.O_CLOEXEC)


# --- reading --------------------------------------------------------------------------------------


def getxattr(fd: int, name: str) -> bytes | None:
    """The value of xattr ``name`` of the object, or None when it has none (or cannot have any)."""
    try:
        return os.getxattr(proc_path(fd), name)
    except OSError as e:
        if e.errno in _NO_XATTR:
            return None
        raise


def listxattr(fd: int) -> list[str]:
    try:
        return os.listxattr(proc_path(fd))
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return []
        raise


def getxattr_named(dirfd: int, name: str, xattr: str) -> bytes | None:
    """:func:`getxattr` of ``name`` in the directory ``dirfd``, without following it (one
    ``lgetxattr`` by the directory's magic link, instead of opening the object)."""
    try:
        return os.getxattr(f"{proc_path(dirfd)}/{name}", xattr, follow_symlinks=False)
    except OSError as e:
        if e.errno in _NO_XATTR:
            return None
        raise


def listxattr_named(dirfd: int, name: str) -> list[str]:
    """:func:`listxattr` of ``name`` in the directory ``dirfd``, without following it."""
    try:
        return os.listxattr(f"{proc_path(dirfd)}/{name}", follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENOTSUP:
            return []
        raise


def readlink(fd: int) -> str:
    return os.readlink("", dir_fd=fd)


def list_names(fd: int, *, noatime: bool = False) -> list[str]:
    """The names in the directory behind an ``O_PATH`` descriptor; ``noatime``: without changing
    its access time (where permitted, as :func:`reopen_noatime`)."""
    if noatime:
        try:
            dfd = os.open(proc_path(fd), os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME | os.O_CLOEXEC)
        except PermissionError:
            dfd = open_dir(fd)
    else:
        dfd = open_dir(fd)
    try:
        return os.listdir(dfd)
    finally:
        os.close(dfd)


# --- the fault-injection seam (tests only; see the module docstring) -----------------------------

FAULT_ENV = "COWFS_FAULT"
KILL_BEFORE = "kill-before"
KILL_AFTER = "kill-after"

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass(slots=True)
class _Faults:
    """What ``COWFS_FAULT`` asked for, and how many changes have been made since arming."""

    at: int | None = None  # the change that gets ``action``
    action: str | None = None  # KILL_BEFORE, KILL_AFTER or an errno name
    count_file: IO[str] | None = None
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def before(self, name: str, args: tuple[object, ...]) -> bool:
        """Count a change about to be made; True if it must be followed by a kill."""
        with self.lock:
            self.done += 1
            n = self.done
            if self.count_file is not None:
                self.count_file.write(f"{n} {name} {' '.join(map(repr, args))}\n")
                self.count_file.flush()
        if n != self.at:
            return False
        log.warning("%s: change %d (%s) gets %s", FAULT_ENV, n, name, self.action)
        if self.action == KILL_BEFORE:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == KILL_AFTER:
            return True
        code = getattr(errno, self.action or "")
        raise OSError(code, f"{os.strerror(code)} (injected by {FAULT_ENV})")


_faults: _Faults | None = None


def parse_faults(spec: str) -> _Faults:
    """Parse a ``COWFS_FAULT`` value (see the module docstring)."""
    faults = _Faults()
    for directive in filter(None, spec.split(",")):
        key, _, value = directive.partition(":")
        if key == "count" and value:
            faults.count_file = open(value, "a", encoding="utf-8")  # noqa: SIM115 (daemon-long)
        elif key.isdigit() and int(key) >= 1 and (
                value in (KILL_BEFORE, KILL_AFTER)
                or (value.startswith("E") and isinstance(getattr(errno, value, None), int))):
            faults.at, faults.action = int(key), value
        else:
            raise CowfsError(f"invalid {FAULT_ENV} directive {directive!r}: give N:kill-before, "
                             "N:kill-after, N:ERRNO (e.g. 3:ENOSPC) or count:FILE")
    return faults


def arm_faults_from_env() -> None:
    """Start counting changes if ``COWFS_FAULT`` is set (tests only); called once, when the mount
    is ready, so that what mounting itself changes (recovery, the work dir) is not counted."""
    global _faults
    spec = os.environ.get(FAULT_ENV)
    if spec:
        _faults = parse_faults(spec)
        log.warning("%s=%s: fault injection armed", FAULT_ENV, spec)


def change(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Mark a wrapper that changes a layer: counted, and failed or killed, by ``COWFS_FAULT``."""
    name = fn.__name__

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        faults = _faults
        if faults is None:
            return fn(*args, **kwargs)
        kill_after = faults.before(name, (*args, *kwargs.values()))
        try:
            return fn(*args, **kwargs)
        finally:
            # Also after a call that failed (EEXIST of a create in place over a whiteout, which
            # the caller answers by building in the work dir): a crash can follow any call.
            if kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    return wrapper


# --- changing the upper layer (every wrapper here carries @change) -----------------------------


def _object(fd: int, opened: bool) -> int | str:
    """What a system call that takes a path or a descriptor is given for the object behind
    ``fd``: an ``O_PATH`` descriptor is named by its magic link (a path the kernel resolves,
    about 3 µs more per call), a descriptor opened for I/O (``opened``) is passed as it is."""
    return fd if opened else proc_path(fd)


@change
def setxattr(fd: int, name: str, value: bytes, flags: int = 0, *, opened: bool = False) -> None:
    """``opened``: ``fd`` is open for I/O, not ``O_PATH`` (so is every keyword below)."""
    log.debug("setxattr fd=%d %s=%r", fd, name, value)
    os.setxattr(_object(fd, opened), name, value, flags)


@change
def removexattr(fd: int, name: str) -> None:
    log.debug("removexattr fd=%d %s", fd, name)
    os.removexattr(proc_path(fd), name)


@change
def chmod(fd: int, mode: int, *, opened: bool = False) -> None:
    log.debug("chmod fd=%d %o", fd, mode)
    os.chmod(_object(fd, opened), mode)


@change
def chown(fd: int, uid: int, gid: int, *, opened: bool = False) -> None:
    """Change owner of the object itself (a symlink's own owner when fd is a symlink)."""
    log.debug("chown fd=%d %d:%d", fd, uid, gid)
    os.chown(_object(fd, opened), uid, gid)


@change
def utimens(fd: int, atime_ns: int, mtime_ns: int, *, opened: bool = False) -> None:
    log.debug("utimens fd=%d %d %d", fd, atime_ns, mtime_ns)
    os.utime(_object(fd, opened), ns=(atime_ns, mtime_ns))


@change
def utimens_now(fd: int) -> None:
    """Both times to the current time (``utimensat`` with no times: allowed on an append-only
    object, where explicit times are not)."""
    log.debug("utimens fd=%d now", fd)
    os.utime(proc_path(fd))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_futimens = libc.futimens
_futimens.argtypes = [ctypes.c_int, ctypes.c_void_p]
_futimens.restype = ctypes.c_int


@change
def touch_atime(fd: int) -> None:
    """The access time of an open file to now, its modification time unchanged."""
    times = (_Timespec * 2)(_Timespec(0, _UTIME_NOW), _Timespec(0, _UTIME_OMIT))
    if _futimens(fd, times) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def protection(fd: int) -> int:
    """The immutable and append-only bits (:data:`PROTECTED`) of an object, from one ``statx``
    on its descriptor (an ``O_PATH`` one will do), without opening it as ``FS_IOC_GETFLAGS``
    needs to; 0 where the filesystem does not say."""
    buf = ctypes.create_string_buffer(256)  # struct statx
    if _statx(fd, b"", _AT_EMPTY_PATH, 0, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    attributes = int.from_bytes(buf.raw[8:16], sys.byteorder)  # stx_attributes
    if attributes & _STATX_ATTR_IMMUTABLE and fs_type(fd) == _EROFS_SUPER_MAGIC:
        # EROFS reports every inode immutable in statx (it is read-only), but its inodes do not
        # carry S_IMMUTABLE, which is what the kernel's overlayfs copies and checks: a name of
        # an EROFS lower may be removed (found by test_lower_on_another_filesystem[erofs]).
        attributes &= ~_STATX_ATTR_IMMUTABLE
    return attributes & PROTECTED


_STATX_ATTR_IMMUTABLE = 0x10
_EROFS_SUPER_MAGIC = 0xE0F5E1E2

#: Filesystems that may number their files anew at each mount: FUSE (the daemon picks the
#: numbers; sshfs hands them out in the order of lookups), NFS, SMB and CIFS, 9P, Ceph.
_RENUMBERING = frozenset({0x65735546, 0x6969, 0x517B, 0xFF534D42, 0xFE534D42, 0x01021997,
                          0x00C36400})


def numbers_last(fd: int) -> bool:
    """Whether the filesystem of ``fd`` keeps its files' inode numbers from one mount to the
    next, so that an origin, which names a lower object by its number, finds it again (local
    filesystems do; see :data:`_RENUMBERING` for those that may not)."""
    return fs_type(fd) not in _RENUMBERING


@change
def truncate(fd: int, size: int) -> None:
    log.debug("truncate fd=%d %d", fd, size)
    os.truncate(proc_path(fd), size)


@change
def create_file(dirfd: int, name: str, mode: int, flags: int = os.O_RDWR) -> int:
    """Create a new regular file (it must not exist) and return it open with ``flags``."""
    log.debug("create dirfd=%d %s %o", dirfd, name, mode)
    return os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                   dir_fd=dirfd)


@change
def mkdir(dirfd: int, name: str, mode: int) -> None:
    log.debug("mkdir dirfd=%d %s %o", dirfd, name, mode)
    os.mkdir(name, mode, dir_fd=dirfd)


@change
def mknod(dirfd: int, name: str, mode: int, rdev: int) -> None:
    log.debug("mknod dirfd=%d %s %o %d", dirfd, name, mode, rdev)
    os.mknod(name, mode, rdev, dir_fd=dirfd)


@change
def mknod_whiteout(dirfd: int, name: str) -> None:
    """A whiteout as the kernel makes it: a 0/0 character device (unprivileged since Linux 5.8)."""
    log.debug("whiteout dirfd=%d %s", dirfd, name)
    os.mknod(name, stat.S_IFCHR, 0, dir_fd=dirfd)


@change
def fsync(fd: int) -> None:
    log.debug("fsync fd=%d", fd)
    os.fsync(fd)


@change
def ftruncate(fd: int, size: int) -> None:
    log.debug("ftruncate fd=%d %d", fd, size)
    os.ftruncate(fd, size)


@change
def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on an open upper file, with any of its modes."""
    log.debug("fallocate fd=%d mode=%#x %d+%d", fd, mode, offset, length)
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@change
def set_fileattr(fd: int, cmd: int, arg: bytes) -> None:
    """``FS_IOC_SETFLAGS`` or ``FS_IOC_FSSETXATTR`` (``cmd``) on an open upper object."""
    log.debug("set fileattr fd=%d cmd=%#x %s", fd, cmd, arg.hex())
    fcntl.ioctl(fd, cmd, arg)


def can_clone(src: int, dst: int) -> bool:
    """Whether ``FICLONE`` works between these two files (a probe: changes nothing visible)."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
    except OSError as e:
        if e.errno not in _NO_REFLINK:
            raise
        return False
    return True


def _bounded(extent: Callable[..., int]) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Ask :func:`cowfs.core.inline.check_copy` before a data copy (``extent``: its size, from the
    arguments after ``src`` and ``dst``), and before it is counted as a change: a copy too long
    for the request loop raises there, and the operation runs again in a worker thread."""

    def decorate(fn: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            src = args[0]
            assert isinstance(src, int)
            inline.check_copy(src, extent(*args[2:]))
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def copy_data(src: int, dst: int, size: int, *, reflink: bool = True) -> bool:
    """Copy a file's data into a new file, in the kernel, keeping holes: a reflink where the
    filesystem has them (``reflink``: as probed, :func:`clone`), else ``copy_file_range`` over
    the data segments, else ``sendfile`` (:func:`copy_bytes`).

    Returns whether the data was cloned whole. A clone needs no ``fsync`` to be durable before
    a later rename: it writes back both files' ranges before it shares the blocks, and is itself
    a metadata change, which the filesystem's journal commits before any later one (the kernel's
    ``ovl_copy_up_file`` skips its ``vfs_fsync`` after a whole clone for the same reason)."""
    if reflink and clone(src, dst):
        return True
    copy_bytes(src, dst, size)
    return False


@change
def clone(src: int, dst: int) -> bool:
    """Make the new file ``dst`` share all of ``src``'s data (``FICLONE``); False, having changed
    nothing, where the two cannot share blocks. A clone moves no data, whatever the size, so the
    request loop may make it (:func:`cowfs.core.inline.check_clone`)."""
    inline.check_clone(src)
    log.debug("clone fd=%d -> fd=%d", src, dst)
    return can_clone(src, dst)


@_bounded(lambda size: size)
@change
def copy_bytes(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes of ``src`` into the new file ``dst``, the data segments only (holes
    stay holes), in the kernel."""
    log.debug("copy data fd=%d -> fd=%d (%d bytes)", src, dst, size)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        _copy_range(src, dst, start, end)
        pos = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(src, dst, end - pos, pos, pos)
        except OSError as e:
            if e.errno not in _NO_COPY_RANGE:
                raise
            os.lseek(dst, pos, os.SEEK_SET)
            n = os.sendfile(dst, src, pos, end - pos)
        if n == 0:  # the source shrank under us; the final ftruncate fixes the size
            return
        pos += n


@_bounded(lambda start, end: end - start)
@change
def copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Copy bytes ``start`` to ``end`` of ``src`` to the same place in ``dst`` (a partial file's
    block coming up, :mod:`cowfs.core.partial`), in the kernel."""
    log.debug("copy range fd=%d -> fd=%d [%d, %d)", src, dst, start, end)
    _copy_range(src, dst, start, end)


#: ``FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE``.
_PUNCH_HOLE = 0x01 | 0x02


@change
def zero_range(fd: int, offset: int, length: int) -> None:
    """Make ``length`` bytes at ``offset`` read as zeros, without changing the size: a hole
    where the filesystem can punch one, else written zeros."""
    log.debug("zero range fd=%d [%d, +%d)", fd, offset, length)
    if _fallocate(fd, _PUNCH_HOLE, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    zeros = bytes(min(length, 1 << 20))
    pos = offset
    while pos < offset + length:
        pos += os.pwrite(fd, zeros[:offset + length - pos], pos)


@change
def fdatasync(fd: int) -> None:
    log.debug("fdatasync fd=%d", fd)
    os.fdatasync(fd)


@change
def symlink(dirfd: int, name: str, target: str) -> None:
    log.debug("symlink dirfd=%d %s -> %s", dirfd, name, target)
    os.symlink(target, name, dir_fd=dirfd)


@change
def link(fd: int, dirfd: int, name: str) -> None:
    """Give the object behind ``fd`` a new name (``linkat`` through /proc follows to the object)."""
    log.debug("link fd=%d -> dirfd=%d %s", fd, dirfd, name)
    os.link(proc_path(fd), name, dst_dir_fd=dirfd, follow_symlinks=True)


@change
def unlink(dirfd: int, name: str) -> None:
    log.debug("unlink dirfd=%d %s", dirfd, name)
    os.unlink(name, dir_fd=dirfd)


@change
def rmdir(dirfd: int, name: str) -> None:
    log.debug("rmdir dirfd=%d %s", dirfd, name)
    os.rmdir(name, dir_fd=dirfd)


@change
def rename(olddirfd: int, oldname: str, newdirfd: int, newname: str, flags: int = 0) -> None:
    """``renameat2``: plain, ``RENAME_NOREPLACE``, ``RENAME_EXCHANGE`` or ``RENAME_WHITEOUT``."""
    log.debug("rename dirfd=%d %s -> dirfd=%d %s flags=%d", olddirfd, oldname, newdirfd, newname,
              flags)
    if _renameat2(olddirfd, os.fsencode(oldname), newdirfd, os.fsencode(newname), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), oldname, None, newname)


def remove_tree(dirfd: int, name: str) -> None:
    """Remove ``name`` and everything under it, never following a symlink (work dir only).

    Each removal is one ``unlink`` or ``rmdir`` wrapper call (so each is counted as a change).
    Iterative, with a bounded number of descriptors (:mod:`cowfs.core.dirstack`): a tree of any
    depth.
    """
    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        unlink(dirfd, name)
        return
    below = dirstack.fd_stack(dirfd)
    try:
        below.push(name, os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 dir_fd=dirfd))
        _writable_to_empty(below.top(), st)
        #: Per level below ``dirfd``: the names still to remove, and the level's own name.
        pending = [(list_names(below.top()), name)]
        while pending:
            names, own = pending[-1]
            if not names:
                pending.pop()
                below.pop()
                rmdir(below.top(), own)
                continue
            child = names.pop()
            fd = below.top()
            child_st = os.stat(child, dir_fd=fd, follow_symlinks=False)
            if not stat.S_ISDIR(child_st.st_mode):
                unlink(fd, child)
                continue
            below.push(child, os.open(child, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW
                                      | os.O_CLOEXEC, dir_fd=fd))
            _writable_to_empty(below.top(), child_st)
            pending.append((list_names(below.top()), child))
    finally:
        below.close()


def _writable_to_empty(fd: int, st: os.stat_result) -> None:
    """A directory of this (non-root) user's own without write or search permission for it (a
    read-only directory of an imported layer) is made so, to be emptied: root needs no bits."""
    if os.geteuid() != 0 and st.st_uid == os.geteuid() and st.st_mode & 0o300 != 0o300:
        chmod(fd, 0o700)


def syncfs(fd: int) -> None:
    """``syncfs(2)``: commit the filesystem that ``fd`` is on (writes nothing of its own)."""
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
