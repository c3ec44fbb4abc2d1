"""Helpers for the conformance tests: the kernel's overlayfs and cowfs run in lockstep.

A :class:`Pair` builds the same layers twice (one copy per side), mounts the kernel's overlayfs on
one copy and cowfs on the other, runs each step on both and compares what the step returned (a
value or an errno name) and the merged views afterwards. Steps are plain tuples (see ``OPS``), so a
failing sequence printed by hypothesis is pasted as is into a regression test.

Layer specs are those of support.py plus two objects the plain builder lacks: :class:`HardLink`
(another name of a file of the same layer) and :class:`Sparse` (a file with holes).

Known limits:
- The view compares mtimes only where they are deterministic: a time set by a fixture or by a
  ``utime`` step (before ``RECENT_NS``) is compared exactly; any later time counts as "recent".
- Descriptors held open by ``hold`` steps are closed by ``remount``, as an unmount needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import mmap
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import (
    CowfsMount,
    Dir,
    DirStream,
    Entry,
    File,
    KernelOverlay,
    Spec,
    assert_same_tree,
    build_layer,
    describe,
    diff_trees,
    renameat2,
    run_steps_as,
    tree_state,
    walk,
)

#: Times before this (2020-09) were set on purpose (fixtures, utime steps) and are compared
#: exactly; anything later is "now" and differs between the two sides by nature.
RECENT_NS = 1_600_000_000 * 10**9
#: Fixture and utime steps use times from here on (2001-09).
OLD_NS = 1_000_000_000 * 10**9

# ---------------------------------------------------------------------------------------------
# Layers with hard links and sparse files.


@dataclass(frozen=True, slots=True)
class HardLink:
    """Another name of ``target`` (a file of the same layer, relative to the layer root)."""

    target: str


@dataclass(frozen=True, slots=True)
class Sparse:
    """A file of ``size`` bytes that holds only ``chunks`` ((offset, data), ...): holes between."""

    size: int
    chunks: tuple[tuple[int, bytes], ...] = ()
    mode: int = 0o644
    times_ns: tuple[int, int] | None = None


def build_layer_ext(root: Path, spec: Spec, name: str) -> Path:
    """support.build_layer, plus HardLink and Sparse objects; directory times are set last."""
    plain = {k: v for k, v in spec.items() if not isinstance(v, HardLink | Sparse)}
    build_layer(root, plain, name)
    for rel, obj in spec.items():
        path = root / rel
        if isinstance(obj, Sparse):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, obj.mode)
            try:
                os.ftruncate(fd, obj.size)
                for offset, data in obj.chunks:
                    os.pwrite(fd, data, offset)
                os.fchmod(fd, obj.mode)
            finally:
                os.close(fd)
            if obj.times_ns is not None:
                os.utime(path, ns=obj.times_ns)
        elif isinstance(obj, HardLink):
            os.link(root / obj.target, path, follow_symlinks=False)
    # Creating the extras changed their parents' times: set the requested ones again.
    for rel, obj in sorted(plain.items(), key=lambda kv: -kv[0].count("/")):
        if isinstance(obj, Dir) and obj.times_ns is not None:
            os.utime(root / rel.rstrip("/"), ns=obj.times_ns)
    return root


# ---------------------------------------------------------------------------------------------
# What a user sees.


def _mtime_class(mtime_ns: int) -> int | str:
    return mtime_ns if mtime_ns < RECENT_NS else "recent"


def view(root: Path) -> dict[str, Entry]:
    """The merged view: support.merged_view plus deterministic mtimes (see RECENT_NS)."""
    out = {}
    for rel, path, st in walk(root):
        entry = describe(path, st, times=True, xattr_prefix="user.")
        out[rel] = dataclasses.replace(entry, mtime_ns=_mtime_class(st.st_mtime_ns), ctime_ns=None)
    return out


# ---------------------------------------------------------------------------------------------
# Steps. A step is a tuple: (op, *args); paths are relative to the mount root. Its outcome is
# "ok", a value, or the errno name of the OSError it raised.

Step = tuple[Any, ...]
Outcome = Any

#: O_NONBLOCK everywhere: opening a FIFO (which a step may meet where it expected a file) must
#: not wait for the other end; it has no effect on regular files.
_NB = os.O_NONBLOCK
_OPEN_FLAGS = {
    "r": os.O_RDONLY | _NB,
    "w": os.O_WRONLY | _NB,
    "rw": os.O_RDWR | _NB,
    "wt": os.O_WRONLY | os.O_TRUNC | _NB,
    "a": os.O_WRONLY | os.O_APPEND | _NB,
    "c": os.O_WRONLY | os.O_CREAT | _NB,
    "cx": os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NB,
}
READ_LIMIT = 1 << 20


def open_flags(how: str) -> int:
    """A short name from _OPEN_FLAGS, or flag names joined by "|" ("O_WRONLY|O_CREAT")."""
    if how in _OPEN_FLAGS:
        return _OPEN_FLAGS[how]
    flags = _NB
    for name in how.split("|"):
        flags |= getattr(os, name)
    return flags


def _open_close(p: Path | str, how: str, mode: int = 0o644) -> str:
    os.close(os.open(p, open_flags(how), mode))
    return "ok"


def _open_write(p: Path | str, how: str, data: bytes, seek: int | None = None) -> int:
    """Open, optionally seek, write; the file position after the write."""
    fd = os.open(p, open_flags(how), 0o644)
    try:
        if seek is not None:
            os.lseek(fd, seek, os.SEEK_SET)
        os.write(fd, data)
        return os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)


def _mmap_write(p: Path | str, offset: int, data: bytes) -> str:
    """Write through a MAP_SHARED mapping of the whole file, msync, unmap."""
    fd = os.open(p, os.O_RDWR | _NB)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[offset : offset + len(data)] = data
            m.flush()
    finally:
        os.close(fd)
    return "ok"


def _lstat(p: Path | str) -> tuple[Any, ...]:
    st = os.lstat(p)
    return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_nlink, _size(st))


def _size(st: os.stat_result) -> int | None:
    return None if stat.S_ISDIR(st.st_mode) else st.st_size


def _times(p: Path | str) -> tuple[Any, Any]:
    st = os.lstat(p)
    return (_mtime_class(st.st_atime_ns), _mtime_class(st.st_mtime_ns))


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
AT_SYMLINK_NOFOLLOW = 0x100


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True)


def _timespec(spec: int | str) -> _Timespec:
    if spec == "now":
        return _Timespec(0, UTIME_NOW)
    if spec == "omit":
        return _Timespec(0, UTIME_OMIT)
    assert isinstance(spec, int)
    return _Timespec(spec // 10**9, spec % 10**9)


def utimensat(p: Path | str, atime: int | str, mtime: int | str, *, nofollow: bool = False) -> str:
    """utimensat(2) with UTIME_NOW ("now") and UTIME_OMIT ("omit"): Python has no binding."""
    times = (_Timespec * 2)(_timespec(atime), _timespec(mtime))
    flags = AT_SYMLINK_NOFOLLOW if nofollow else 0
    if _libc.utimensat(-100, os.fsencode(p), times, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(p))
    return "ok"


def _statvfs(p: Path | str) -> tuple[int, ...]:
    v = os.statvfs(p)
    return (v.f_bsize, v.f_frsize, v.f_blocks, v.f_files, v.f_namemax)


def _with_fd(p: Path | str, flags: int, fn: Callable[[int], Any]) -> str:
    fd = os.open(p, flags)
    try:
        fn(fd)
    finally:
        os.close(fd)
    return "ok"


FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_APPEND_FL = 0x20
FS_IMMUTABLE_FL = 0x10
FS_NOATIME_FL = 0x80
#: The inode flags an ``lsattr`` step shows: those a user sets (the others, such as ext4's
#: extents flag, depend on how the real file was written).
USER_FLAGS = FS_APPEND_FL | FS_IMMUTABLE_FL | FS_NOATIME_FL | 0x40 | 0x8  # NODUMP, SYNC


ACL_ACCESS, ACL_DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
_ACL_TAGS = {"u": 0x01, "U": 0x02, "g": 0x04, "G": 0x08, "m": 0x10, "o": 0x20}


def acl(*entries: str) -> bytes:
    """An ACL xattr value from entries such as ``u::rw-``, ``U:1000:r--`` (a named user),
    ``g::r-x``, ``G:1000:rwx``, ``m::rwx``, ``o::---``."""
    value = (2).to_bytes(4, "little")
    for entry in entries:
        tag, who, perms = entry.split(":")
        bits = sum(bit for bit, c in zip((4, 2, 1), perms, strict=True) if c != "-")
        ident = int(who) if who else 0xFFFFFFFF
        value += (_ACL_TAGS[tag].to_bytes(2, "little") + bits.to_bytes(2, "little")
                  + ident.to_bytes(4, "little"))
    return value


def _flags_fd(p: Path | str) -> int:
    return os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)


def _lsattr(p: Path | str) -> int:
    """The user-set inode flags (FS_IOC_GETFLAGS)."""
    fd = _flags_fd(p)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        return int.from_bytes(buf[:4], sys.byteorder) & USER_FLAGS
    finally:
        os.close(fd)


def _chattr(p: Path | str, add: int, remove: int = 0) -> str:
    """chattr: FS_IOC_GETFLAGS, then FS_IOC_SETFLAGS with ``add`` set and ``remove`` cleared."""
    fd = _flags_fd(p)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        flags = (int.from_bytes(buf[:4], sys.byteorder) | add) & ~remove
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags.to_bytes(8, sys.byteorder))
        return "ok"
    finally:
        os.close(fd)


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _seekdir(p: Path | str) -> tuple[bool, bool]:
    """A directory read through libc, then sought: whether seekdir() to each telldir() position
    reads on exactly from there, and whether seekdir() to an offset no entry had (one past each
    position, below the last entry's) reads on to the last entry (ext4's offsets are hashes, the
    kernel's overlayfs's and cowfs's indexes: what both share is comparable)."""
    with DirStream(Path(p)) as stream:
        positions, names = stream.read_with_positions()
        back = True
        for i, position in enumerate(positions):
            stream.seek(position)
            back = back and stream.read_all() == names[i:]
        between = True
        for position in positions[:-2]:
            if position + 1 not in positions and position + 1 < positions[-2]:
                stream.seek(position + 1)
                rest = stream.read_all()
                between = between and bool(rest) and rest[-1] == names[-1]
    return back, between


def _read(p: Path | str) -> bytes:
    fd = os.open(p, os.O_RDONLY | _NB)
    try:
        return os.pread(fd, READ_LIMIT, 0)
    finally:
        os.close(fd)


def _fstat(fd: int) -> tuple[Any, ...]:
    st = os.fstat(fd)
    return (stat.filemode(st.st_mode), st.st_size, st.st_nlink)


def _done(fn: Callable[..., Any]) -> Callable[..., str]:
    def run(*args: Any, **kwargs: Any) -> str:
        fn(*args, **kwargs)
        return "ok"

    return run


def _at(root: Path, rel: str) -> str:
    """``root/rel`` as the kernel will see it: pathlib would drop a trailing slash ("must be a
    directory") and "." components."""
    return f"{root}/{rel}"


#: op name -> function(root, fds, *args). ``fds`` maps a hold number to a descriptor.
OPS: dict[str, Callable[..., Outcome]] = {
    "open": lambda r, fds, p, how, mode=0o644: _open_close(_at(r, p), how, mode),
    "pwrite": lambda r, fds, p, off, data: _with_fd(
        _at(r, p), os.O_WRONLY | _NB, lambda fd: os.pwrite(fd, data, off)
    ),
    "append": lambda r, fds, p, data: _with_fd(
        _at(r, p), os.O_WRONLY | os.O_APPEND | _NB, lambda fd: os.write(fd, data)
    ),
    "truncate": lambda r, fds, p, size: _done(os.truncate)(_at(r, p), size),
    "unlink": lambda r, fds, p: _done(os.unlink)(_at(r, p)),
    "mkdir": lambda r, fds, p, mode=0o755: _done(os.mkdir)(_at(r, p), mode),
    "rmdir": lambda r, fds, p: _done(os.rmdir)(_at(r, p)),
    "rename": lambda r, fds, a, b, flags=0: _done(renameat2)(_at(r, a), _at(r, b), flags),
    "symlink": lambda r, fds, target, p: _done(os.symlink)(target, _at(r, p)),
    "link": lambda r, fds, a, b: _done(os.link)(_at(r, a), _at(r, b), follow_symlinks=False),
    "mknod": lambda r, fds, p, mode, major=0, minor=0: _done(os.mknod)(
        _at(r, p), mode, os.makedev(major, minor)
    ),
    "chmod": lambda r, fds, p, mode: _done(os.chmod)(_at(r, p), mode),
    "chown": lambda r, fds, p, uid, gid: _done(os.chown)(
        _at(r, p), uid, gid, follow_symlinks=False
    ),
    "utime": lambda r, fds, p, atime, mtime: _done(os.utime)(
        _at(r, p), ns=(atime, mtime), follow_symlinks=False
    ),
    "setxattr": lambda r, fds, p, name, value, flags=0: _done(os.setxattr)(
        _at(r, p), name, value, flags, follow_symlinks=False
    ),
    "removexattr": lambda r, fds, p, name: _done(os.removexattr)(
        _at(r, p), name, follow_symlinks=False
    ),
    "getxattr": lambda r, fds, p, name: os.getxattr(_at(r, p), name, follow_symlinks=False),
    "open_write": lambda r, fds, p, how, data, seek=None: _open_write(_at(r, p), how, data, seek),
    "mmap_write": lambda r, fds, p, off, data: _mmap_write(_at(r, p), off, data),
    "fsync": lambda r, fds, p, how="w": _with_fd(
        _at(r, p), open_flags(how), lambda fd: (os.fsync(fd), os.fdatasync(fd))
    ),
    "statvfs": lambda r, fds, p=".": _statvfs(_at(r, p)),
    "stat": lambda r, fds, p: _lstat(_at(r, p)),
    "times": lambda r, fds, p: _times(_at(r, p)),  # atime too: only where nothing read since
    "mtime": lambda r, fds, p: _times(_at(r, p))[1],
    "utimensat": lambda r, fds, p, atime, mtime, nofollow=False: utimensat(
        _at(r, p), atime, mtime, nofollow=nofollow
    ),
    "exists": lambda r, fds, p: os.path.lexists(_at(r, p)),
    "chattr": lambda r, fds, p, add, remove=0: _chattr(_at(r, p), add, remove),
    "lsattr": lambda r, fds, p: _lsattr(_at(r, p)),
    "fallocate": lambda r, fds, p, mode, off, length: _with_fd(
        _at(r, p), os.O_WRONLY | _NB, lambda fd: fallocate(fd, mode, off, length)
    ),
    "read": lambda r, fds, p: _read(_at(r, p)),
    "readlink": lambda r, fds, p: os.readlink(_at(r, p)),
    "listdir": lambda r, fds, p: sorted(os.listdir(_at(r, p))),
    "seekdir": lambda r, fds, p: _seekdir(_at(r, p)),
    # Descriptors kept open across steps: hold number n is the n-th hold step of the run.
    "hold": lambda r, fds, p, how: _hold(_at(r, p), fds, how),
    "fd_read": lambda r, fds, n: os.pread(fds[n], READ_LIMIT, 0),
    "fd_write": lambda r, fds, n, off, data: _done(os.pwrite)(fds[n], data, off),
    "fd_truncate": lambda r, fds, n, size: _done(os.ftruncate)(fds[n], size),
    "fd_stat": lambda r, fds, n: _fstat(fds[n]),
    "fd_fsync": lambda r, fds, n: _done(os.fsync)(fds[n]),
    "close": lambda r, fds, n: _done(os.close)(fds.pop(n)),
}


def _hold(p: Path | str, fds: dict[int, int], how: str) -> str:
    number = fds.get(-1, 0)  # the next hold number (key -1 is the counter); a failed hold uses
    fds[-1] = number + 1  # its number too, so both sides keep counting alike
    fds[number] = os.open(p, _OPEN_FLAGS[how])
    return "ok"


def run_op(root: Path, fds: dict[int, int], step: Step) -> Outcome:
    """One step below ``root``; an OSError becomes its errno name."""
    op, *args = step
    try:
        return OPS[op](root, fds, *args)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, f"errno {e.errno}")


def close_all(fds: dict[int, int]) -> None:
    for number in [n for n in fds if n >= 0]:
        with contextlib.suppress(OSError):
            os.close(fds.pop(number))


# ---------------------------------------------------------------------------------------------
# A step that never returns.

#: How long one step may take on cowfs before its FUSE connection is aborted.
STEP_SECONDS = 20.0


class StepWatchdog:
    """Aborts a FUSE mount (umount -f) when one step takes longer than ``seconds``.

    A request the daemon never answers blocks the test inside the kernel, where nothing in the
    test process can interrupt it; aborting the connection fails the request (ENOTCONN), and the
    step is then reported as hung. One thread per pair, armed around each step.
    """

    def __init__(self, mnt: Path, seconds: float = STEP_SECONDS) -> None:
        self.mnt = mnt
        self.seconds = seconds
        self.fired = False
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="step-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._deadline = None
                self.fired = True
                subprocess.run(["umount", "-f", str(self.mnt)], capture_output=True, check=False)

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        with self._cond:
            self._deadline = time.monotonic() + self.seconds
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


def trace(message: str) -> None:
    """With CONFORMANCE_TRACE=1, print each step as it starts (to find a step that hangs)."""
    if os.environ.get("CONFORMANCE_TRACE"):
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The pair.


@dataclass(frozen=True, slots=True)
class Tolerated:
    """A step outcome where cowfs differs from the kernel on purpose; see the test module."""

    name: str
    reason: str
    #: The step operations it may apply to (only their steps pay for a look at the view).
    ops: frozenset[str]
    #: (step, merged view before the step, cowfs's outcome) -> does this difference apply?
    applies: Callable[[Step, Mapping[str, Entry], Outcome], bool]


@dataclass(slots=True)
class Side:
    name: str
    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path
    fds: dict[int, int] = field(default_factory=dict)
    mount: Any = None


def _build_side(
    base: Path,
    mnt_parent: Path,
    label: str,
    lowers: Sequence[Spec],
    upper: Spec | None,
    prebuilt: Sequence[Path] = (),
) -> Side:
    root = base / label
    lower_dirs = [build_layer_ext(root / f"lower{i}", s, f"lower{i}") for i, s in enumerate(lowers)]
    for i, src in enumerate(prebuilt, start=len(lowers)):
        # cp -a keeps hard links, times, modes, owners and xattrs: the same layer twice.
        dst = root / f"lower{i}"
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", "--preserve=all", str(src), str(dst)], check=True)
        lower_dirs.append(dst)
    upper_dir = build_layer_ext(root / "upper", upper or {}, "upper")
    work = root / "work"
    work.mkdir()
    mnt = mnt_parent / f"{label}-mnt"
    mnt.mkdir()
    return Side(label, lower_dirs, upper_dir, work, mnt)


class Pair:
    """The kernel's overlayfs (reference) and cowfs (subject) over identical layer copies."""

    def __init__(
        self,
        base: Path,
        lowers: Sequence[Spec],
        *,
        upper: Spec | None = None,
        kernel_options: Sequence[str] = (),
        cowfs_options: Sequence[str] = (),
        tolerated: Sequence[Tolerated] = (),
        public: bool = False,
        watchdog: float | None = None,
        prebuilt_lowers: Sequence[Path] = (),
    ) -> None:
        """``prebuilt_lowers``: directories copied (cp -a) as further lower layers, below the
        ones built from ``lowers``."""
        self.base = base
        self._public = Path(tempfile.mkdtemp(prefix="cowfs-pair-")) if public else None
        mnt_parent = self._public or base
        if self._public is not None:
            self._public.chmod(0o755)
        sides = [
            _build_side(base, mnt_parent, label, lowers, upper, prebuilt_lowers)
            for label in ("kernel", "cowfs")
        ]
        self.kernel_side, self.cowfs_side = sides
        k, c = self.kernel_side, self.cowfs_side
        k.mount = KernelOverlay(k.lowers, k.upper, k.work, k.mnt, extra_opts=kernel_options)
        c.mount = CowfsMount(
            c.lowers, c.upper, c.mnt, options=cowfs_options, log_dir=base, watchdog=watchdog
        )
        self.tolerated = tuple(tolerated)
        self.seen: list[tuple[Step, str]] = []  # (step, tolerated name) where one applied
        self.lower_states = {p: tree_state(p) for s in (k, c) for p in s.lowers}
        self.step_watchdog = StepWatchdog(c.mnt)

    @property
    def kernel(self) -> Path:
        return self.kernel_side.mnt

    @property
    def cowfs(self) -> Path:
        return self.cowfs_side.mnt

    @property
    def cowfs_mount(self) -> CowfsMount:
        return self.cowfs_side.mount

    def reproducer(self) -> str:
        return f"kernel: {self.kernel_side.mount.reproducer}\n{self.cowfs_mount.describe()}"

    def start(self) -> None:
        self.kernel_side.mount.start()
        self.cowfs_side.mount.start()

    def stop(self) -> None:
        """Close held descriptors and unmount both sides, whatever fails on the way."""
        with contextlib.ExitStack() as stack:
            stack.callback(self.step_watchdog.close)
            for side in (self.kernel_side, self.cowfs_side):
                stack.callback(side.mount.stop)
                stack.callback(close_all, side.fds)
        if self._public is not None:
            for side in (self.kernel_side, self.cowfs_side):
                side.mnt.rmdir()  # fails (keeping everything) if something is still mounted
            self._public.rmdir()
            self._public = None

    def remount(self) -> None:
        for side in (self.kernel_side, self.cowfs_side):
            close_all(side.fds)
            side.mount.remount()

    # --- running steps ------------------------------------------------------------------------

    def run(self, step: Step) -> Outcome:
        """One step on both sides: cowfs first, then the kernel unless a tolerated difference
        applies (then the kernel skips the step, so both stay in the same state). Asserts equal
        outcomes; returns cowfs's."""
        if step == ("remount",):
            self.remount()
            return "ok"
        if step[0] == "as":  # ("as", uid, gid, step): the step as that user (a public pair)
            return self.run_as(step[1], step[2], step[3])
        trace(f"step {step!r}")
        tolerated = [t for t in self.tolerated if step[0] in t.ops]
        # Looking at the view reads files, which changes atimes on the kernel's side: only when
        # a tolerated difference needs it.
        before = view(self.kernel) if tolerated else {}
        with self.step_watchdog.armed():
            got = run_op(self.cowfs, self.cowfs_side.fds, step)
        assert not self.step_watchdog.fired, (
            f"{step!r}: cowfs did not answer within {self.step_watchdog.seconds}s; the FUSE "
            "connection was aborted"
        )
        for t in tolerated:
            if t.applies(step, before, got):
                self.seen.append((step, t.name))
                return got
        expected = run_op(self.kernel, self.kernel_side.fds, step)
        assert got == expected, f"{step!r}: kernel {_short(expected)}, cowfs {_short(got)}"
        return got

    def run_all(self, steps: Sequence[Step], *, check_each: bool = True) -> None:
        for i, step in enumerate(steps):
            try:
                self.run(step)
                if check_each:
                    self.check(f"after step {i} {step!r}")
            except AssertionError as e:
                e.add_note(f"step {i} of {len(steps)}: {step!r}")
                raise
        self.check("at the end")

    def run_as(self, uid: int, gid: int, step: Step, *, umask: int = 0o022) -> Outcome:
        """One step in a forked child running as uid:gid (no supplementary groups), on both
        sides; asserts equal outcomes and returns cowfs's."""
        outcomes = [
            run_steps_as(uid, gid, root, [lambda r: run_op(r, {}, step)], umask=umask)[0]
            for root in (self.cowfs, self.kernel)
        ]
        got, expected = outcomes
        assert got == expected, (
            f"{step!r} as {uid}:{gid}: kernel {_short(expected)}, cowfs {_short(got)}"
        )
        return got

    def check_remounted(self) -> None:
        """check(), then remount both sides and check again: what each showed was persisted."""
        self.check()
        self.remount()
        self.check("after remounting both")

    def check(self, when: str = "") -> None:
        self.assert_same_view(when)
        self.assert_lowers_unchanged()

    def assert_same_view(self, when: str = "") -> None:
        expected = view(self.kernel)
        with self.step_watchdog.armed():
            actual = view(self.cowfs)
        assert not self.step_watchdog.fired, f"cowfs did not answer within the step time {when}"
        diff = diff_trees(expected, actual, ("kernel", "cowfs"))
        assert not diff, f"merged views differ {when} (kernel vs cowfs):\n{diff}"

    def assert_lowers_unchanged(self) -> None:
        for path, state in self.lower_states.items():
            assert_same_tree(state, tree_state(path), f"lower layer {path}")


def _short(outcome: Outcome) -> str:
    text = repr(outcome)
    return text if len(text) <= 200 else text[:200] + "..."


@contextlib.contextmanager
def started_pair(base: Path, lowers: Sequence[Spec], **kwargs: Any) -> Iterator[Pair]:
    """A started Pair that is always unmounted; the lower layers are checked at the end."""
    pair = Pair(base, lowers, **kwargs)
    try:
        pair.start()
        yield pair
    except BaseException as exc:
        exc.add_note(pair.reproducer())
        raise
    finally:
        pair.stop()
    pair.assert_lowers_unchanged()


# ---------------------------------------------------------------------------------------------
# Standard layers for the POSIX tests: every kind of object on the lower only, the upper only,
# and on both (merged), named "<place>_<kind>": f file, d directory with a child, e empty
# directory, l symlink to the file of the same place.

PLACES = ("lo", "up", "mg")
PLACE_IDS = ["lower-only", "upper-only", "merged"]
_T = (OLD_NS, OLD_NS)


def _standard(places: Sequence[str], layer: str) -> dict[str, Any]:
    """Files and directories carry ``user.layer`` (the layer's name) and ``user.<place>``."""
    spec: dict[str, Any] = {}
    for p in places:
        xattrs = {"user.layer": layer, f"user.{p}": "1"}
        spec[f"{p}_f"] = File(times_ns=_T, xattrs=xattrs)
        spec[f"{p}_d"] = Dir(times_ns=_T, xattrs=xattrs)
        if p != "mg":  # the merged directory gets "lc" from the lower, "uc" from the upper
            spec[f"{p}_d/c"] = File(times_ns=_T)
        spec[f"{p}_e"] = Dir(times_ns=_T, xattrs=xattrs)
        spec[f"{p}_l@"] = f"{p}_f"
    return spec


#: ``@each_place``: a test runs once per place (the objects named "<place>_<kind>").
each_place = pytest.mark.parametrize("place", PLACES, ids=PLACE_IDS)

STANDARD_LOWER: Spec = {
    **_standard(["lo", "mg"], "lower"),
    "lo_d/sub/x": File(times_ns=_T),
    "mg_d/lc": File(times_ns=_T),
}
STANDARD_UPPER: Spec = {
    **_standard(["up", "mg"], "upper"),
    "up_d/sub/x": File(times_ns=_T),
    "mg_d/uc": File(times_ns=_T),
}


@contextlib.contextmanager
def standard_pair(base: Path, **kwargs: Any) -> Iterator[Pair]:
    """A started pair over STANDARD_LOWER and STANDARD_UPPER."""
    with started_pair(base, [STANDARD_LOWER], upper=STANDARD_UPPER, **kwargs) as pair:
        yield pair


def reference() -> dict[str, Any]:
    """Pair arguments for the reference of the model in test_conformance_stateful.py (kernel
    options and tolerated differences), which is the one place that states them."""
    from test_conformance_stateful import KERNEL_OPTIONS, TOLERATED

    return {"kernel_options": KERNEL_OPTIONS, "tolerated": tuple(TOLERATED.values())}


def standard_pair_fixture(tmp_path: Path) -> Iterator[Pair]:
    """A POSIX module's ``pair`` fixture: ``pair = pytest.fixture(standard_pair_fixture,
    name="pair")``: the standard layers under the model's reference."""
    with standard_pair(tmp_path, **reference()) as p:
        yield p


def fresh_dir(parent: Path, prefix: str) -> Path:
    """A new empty directory under ``parent``."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def remove_tree(path: Path) -> None:
    """rm -r that refuses to cross into another filesystem (a mount left behind)."""
    dev = os.lstat(path).st_dev
    for rel, p, st in walk(path):
        if st.st_dev != dev:
            raise AssertionError(f"{p} ({rel}) is on another filesystem: not removing {path}")
    shutil.rmtree(path)
