"""Helpers for the real-mount tests: layer builders, tree snapshots, step runners, mount managers.

No pytest fixtures live here (they are in conftest.py), so a scratch script can import this module
and replay a failing test by hand: every mount manager records the exact command it ran.

Known limits:
- ``tree_state`` and ``merged_view`` read every regular file whole to hash it; keep layers small
  except in the tests that are about size.
- ``run_steps_as`` forks the test process; outcomes come back pickled.
- ``layer_problems`` runs the offline checker in the test process (``cowfs check`` as a subprocess
  costs 0.22 s, too much to pay after each of ~500 mount tests); it is the function the command
  calls, so it finds what the command finds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import io
import os
import pickle
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

# ---------------------------------------------------------------------------------------------
# The layer format, as the tests see it (the spec, not cowfs.core.schema: the tests must not trust
# the code they test).

WHITEOUT_XATTR = "user.overlay.whiteout"
OPAQUE_XATTR = "user.overlay.opaque"
FORMAT_XATTR = "user.cowfs.format"
DEFAULT_WORK_NAME = ".cowfs-work"
OPAQUE_USER = {OPAQUE_XATTR: b"y"}
OPAQUE_TRUSTED = {"trusted.overlay.opaque": b"y"}

MOUNT_TIMEOUT = 15.0
EXIT_TIMEOUT = 15.0

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


# ---------------------------------------------------------------------------------------------
# Layer specs: a dict maps a relative path to what lies there. Shorthands: "d/" -> Dir(),
# "l@" -> Symlink(value), "f" -> File(value) where a None value means content "<layer>:<path>",
# so every read shows which layer served it.


@dataclass(frozen=True, slots=True)
class File:
    content: bytes | str | None = None
    mode: int = 0o644
    uid: int | None = None  # None: whoever builds the layer (root, or the plain user)
    gid: int | None = None
    xattrs: Mapping[str, bytes | str] = field(default_factory=dict)
    times_ns: tuple[int, int] | None = None  # (atime, mtime)


@dataclass(frozen=True, slots=True)
class Dir:
    mode: int = 0o755
    uid: int | None = None
    gid: int | None = None
    xattrs: Mapping[str, bytes | str] = field(default_factory=dict)
    times_ns: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Symlink:
    target: str


@dataclass(frozen=True, slots=True)
class Fifo:
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Device:
    kind: str  # "c" or "b"
    major: int
    minor: int
    mode: int = 0o644


@dataclass(frozen=True, slots=True)
class Whiteout:
    """A whiteout in a layer: the kernel's 0/0 character device, or an xattr-marked empty file.

    The xattr form needs its parent marked ``overlay.opaque=x`` (in the same namespace); the
    builder does that unless ``mark_parent`` is false.
    """

    form: str = "chardev"  # "chardev" or "xattr"
    namespace: str = "user"  # for the xattr form: "user" or "trusted"
    mark_parent: bool = True


Spec = Mapping[str, Any]


def needs_root(what: str) -> None:
    """Skip the running test when not root: ``what`` needs privileges a plain user lacks (the
    mount tests also run as uid 65534, see scripts/test-as-user.sh)."""
    if os.geteuid() != 0:
        import pytest

        pytest.skip(f"needs root: {what}")


def _normalise(key: str, value: Any) -> tuple[str, Any]:
    if key.endswith("/"):
        return key.rstrip("/"), value if isinstance(value, Dir) else Dir()
    if key.endswith("@"):
        return key[:-1], value if isinstance(value, Symlink) else Symlink(str(value))
    if value is None or isinstance(value, str | bytes):
        return key, File(value)
    return key, value


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def build_layer(root: Path, spec: Spec, name: str) -> Path:
    """Create ``root`` and everything in ``spec`` inside it; returns ``root``.

    Metadata (owner, mode, times) is applied after every object exists, deepest first, so that
    creating a child does not disturb a directory's requested mtime.
    """
    root.mkdir(parents=True, exist_ok=True)
    items = dict(_normalise(k, v) for k, v in spec.items())
    for rel in sorted(items, key=lambda p: (p.count("/"), p)):
        _create(root, rel, items[rel], name)
    for rel in sorted(items, key=lambda p: -p.count("/")):
        _apply_metadata(root / rel, items[rel])
    return root


def _create(root: Path, rel: str, obj: Any, layer: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    match obj:
        case Dir():
            path.mkdir(exist_ok=True)
        case File(content=content):
            path.write_bytes(_as_bytes(f"{layer}:{rel}" if content is None else content))
        case Symlink(target=target):
            path.symlink_to(target)
        case Fifo(mode=mode):
            os.mkfifo(path, mode)
        case Device(kind=kind, major=major, minor=minor, mode=mode):
            kind_bits = stat.S_IFCHR if kind == "c" else stat.S_IFBLK
            needs_root("a device node in a layer")
            os.mknod(path, kind_bits | mode, os.makedev(major, minor))
        case Whiteout(form="chardev"):
            os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        case Whiteout(form="xattr", namespace=ns, mark_parent=mark):
            if ns == "trusted":
                needs_root("trusted.* xattrs")
            path.write_bytes(b"")
            os.setxattr(path, f"{ns}.overlay.whiteout", b"")
            if mark:
                os.setxattr(path.parent, f"{ns}.overlay.opaque", b"x")
        case _:
            raise TypeError(f"unknown layer object for {rel!r}: {obj!r}")


def _apply_metadata(path: Path, obj: Any) -> None:
    if isinstance(obj, File | Dir):
        for name, value in obj.xattrs.items():
            if name.startswith("trusted."):
                needs_root("trusted.* xattrs")
            os.setxattr(path, name, _as_bytes(value))
        if obj.uid is not None or obj.gid is not None:
            st = os.lstat(path)
            if (obj.uid, obj.gid) != (st.st_uid, st.st_gid):
                needs_root("objects owned by another user")
            os.chown(path, -1 if obj.uid is None else obj.uid, -1 if obj.gid is None else obj.gid)
        os.chmod(path, obj.mode)
        if obj.times_ns is not None:
            os.utime(path, ns=obj.times_ns)


# ---------------------------------------------------------------------------------------------
# Tree snapshots.


@dataclass(frozen=True, slots=True)
class Entry:
    """What one object in a tree looks like; fields that do not apply are None."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    sha256: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    nlink: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()


_KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
}


def kind_of(st: os.stat_result) -> str:
    return _KINDS[stat.S_IFMT(st.st_mode)]


def sha256_of(path: Path) -> str:
    """The content's digest, read without changing the access time where permitted (so that a
    test can check that a mount leaves access times alone)."""
    digest = hashlib.sha256()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOATIME | os.O_CLOEXEC)
    except PermissionError:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def xattrs_of(path: Path, prefix: str = "") -> tuple[tuple[str, bytes], ...]:
    try:
        listed = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno != errno.EOPNOTSUPP:
            raise
        listed = []  # a filesystem without xattrs (sshfs, a squashfs image made without any)
    names = sorted(n for n in listed if n.startswith(prefix))
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)


def _list_noatime(directory: Path) -> list[str]:
    """os.listdir without changing the directory's access time where permitted (as sha256_of)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME | os.O_CLOEXEC)
    except PermissionError:
        return os.listdir(directory)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def walk(root: Path) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Every object under ``root`` (itself as "."), parents before children, by lstat."""
    yield ".", root, os.lstat(root)
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        for name in sorted(_list_noatime(directory)):
            path = directory / name
            rel = prefix + name
            st = os.lstat(path)
            yield rel, path, st
            if stat.S_ISDIR(st.st_mode):
                pending.append((path, rel + "/"))


def describe(path: Path, st: os.stat_result, *, times: bool, xattr_prefix: str) -> Entry:
    kind = kind_of(st)
    is_dir = kind == "dir"
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=None if is_dir else st.st_size,
        sha256=sha256_of(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None,
        nlink=None if is_dir else st.st_nlink,
        mtime_ns=st.st_mtime_ns if times else None,
        ctime_ns=st.st_ctime_ns if times else None,
        xattrs=xattrs_of(path, xattr_prefix),
    )


def tree_state(root: Path, *, times: bool = True, skip: Sequence[str] = ()) -> dict[str, Entry]:
    """A full, comparable description of a real tree (a layer): all xattrs, mtime and ctime.

    Two snapshots of a layer are equal only if nothing in it was written, chmod'ed, renamed,
    created or removed (atime is left out: reading is allowed). ``skip`` drops relative paths and
    everything under them.
    """
    return {
        rel: describe(path, st, times=times, xattr_prefix="")
        for rel, path, st in walk(root)
        if not _skipped(rel, skip)
    }


def merged_view(root: Path) -> dict[str, Entry]:
    """What a user sees through a mount: no times, no inode numbers, only user.* xattrs."""
    return {
        rel: describe(path, st, times=False, xattr_prefix="user.") for rel, path, st in walk(root)
    }


def _skipped(rel: str, skip: Sequence[str]) -> bool:
    return any(rel == s or rel.startswith(s + "/") for s in skip)


def diff_trees(
    expected: Mapping[str, Entry], actual: Mapping[str, Entry], labels: tuple[str, str]
) -> str:
    """A short, readable list of the differences between two snapshots ('' if equal)."""
    lines = []
    for rel in sorted(set(expected) | set(actual)):
        a, b = expected.get(rel), actual.get(rel)
        if a == b:
            continue
        if a is None:
            lines.append(f"  {rel}: only in {labels[1]}: {b}")
        elif b is None:
            lines.append(f"  {rel}: only in {labels[0]}: {a}")
        else:
            changed = [
                f"{f}: {getattr(a, f)!r} != {getattr(b, f)!r}"
                for f in a.__slots__
                if getattr(a, f) != getattr(b, f)
            ]
            lines.append(f"  {rel}: " + "; ".join(changed))
    if len(lines) > 40:
        lines = [*lines[:40], f"  ... and {len(lines) - 40} more"]
    return "\n".join(lines)


def assert_same_tree(
    expected: Mapping[str, Entry],
    actual: Mapping[str, Entry],
    what: str,
    labels=("before", "after"),
) -> None:
    diff = diff_trees(expected, actual, labels)
    assert not diff, f"{what} differ ({labels[0]} vs {labels[1]}):\n{diff}"


# ---------------------------------------------------------------------------------------------
# Steps: the same operations run on two mounts, outcomes compared. An outcome is "ok", a value
# (bytes, list, tuple, bool, int), or the errno name ("ENOENT") of the OSError it raised.

Step = tuple[Any, ...] | Callable[[Path], Any]
Outcome = Any

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def renameat2(src: Path | str, dst: Path | str, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE): Python has no binding."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _write(p: Path, data: bytes) -> str:
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return "ok"


def _pwrite(p: Path, offset: int, data: bytes) -> str:
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return "ok"


def _append(p: Path, data: bytes) -> str:
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return "ok"


def _create_excl(p: Path, mode: int = 0o644) -> str:
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    return "ok"


def _stat(p: Path) -> tuple[Any, ...]:
    st = os.lstat(p)
    kind = kind_of(st)
    if kind == "dir":
        return (kind, stat.S_IMODE(st.st_mode))
    return (kind, stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink)


def _ok(fn: Callable[..., Any]) -> Callable[..., str]:
    def run(*args: Any, **kwargs: Any) -> str:
        fn(*args, **kwargs)
        return "ok"

    return run


_OPS: dict[str, Callable[..., Any]] = {
    "write": _write,  # (path, data): create or truncate, then write
    "pwrite": _pwrite,  # (path, offset, data): open O_WRONLY, no truncation
    "append": _append,  # (path, data)
    "create": _create_excl,  # (path[, mode]): O_CREAT|O_EXCL
    "read": lambda p: p.read_bytes(),
    "truncate": _ok(os.truncate),  # (path, size)
    "mkdir": _ok(os.mkdir),  # (path[, mode])
    "rmdir": _ok(os.rmdir),
    "unlink": _ok(os.unlink),
    "rmtree": _ok(shutil.rmtree),
    "rename": lambda a, b, flags=0: _ok(renameat2)(a, b, flags),  # (src, dst[, flags])
    "link": lambda a, b: _ok(os.link)(a, b, follow_symlinks=False),  # (existing, new)
    "symlink": lambda target, p: _ok(os.symlink)(str(target), p),  # (target text, path)
    "readlink": lambda p: ("->", os.readlink(p)),
    "mkfifo": _ok(os.mkfifo),  # (path[, mode])
    "mknod": lambda p, mode, major, minor: _ok(os.mknod)(p, mode, os.makedev(major, minor)),
    "chmod": _ok(os.chmod),  # (path, mode)
    "chown": lambda p, uid, gid: _ok(os.chown)(p, uid, gid, follow_symlinks=False),
    "utime": lambda p, a, m: _ok(os.utime)(p, ns=(a, m), follow_symlinks=False),
    "mtime": lambda p: os.lstat(p).st_mtime_ns,
    "setxattr": lambda p, n, v: _ok(os.setxattr)(p, n, v, follow_symlinks=False),
    "getxattr": lambda p, n: os.getxattr(p, n, follow_symlinks=False),
    "removexattr": lambda p, n: _ok(os.removexattr)(p, n, follow_symlinks=False),
    "listxattr": lambda p: sorted(os.listxattr(p, follow_symlinks=False)),
    "listdir": lambda p: sorted(os.listdir(p)),
    "stat": _stat,  # (kind, mode[, size, nlink])
    "exists": os.path.lexists,
}

# Arguments at these positions (after the op name) are paths relative to the mount root.
_PATH_ARGS = {"rename": (0, 1), "link": (0, 1), "symlink": (1,)}


def run_step(root: Path, step: Step) -> Outcome:
    """Apply one step below ``root``; an OSError becomes its errno name."""
    try:
        if callable(step):
            return step(root)
        op, *args = step
        paths = _PATH_ARGS.get(op, (0,))
        real = [root / a if i in paths else a for i, a in enumerate(args)]
        return _OPS[op](*real)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, f"errno {e.errno}")


def run_steps(root: Path, steps: Sequence[Step]) -> list[Outcome]:
    return [run_step(root, step) for step in steps]


def format_outcomes(
    steps: Sequence[Step], expected: Sequence[Outcome], actual: Sequence[Outcome], labels
) -> str:
    lines = []
    for i, (step, a, b) in enumerate(zip(steps, expected, actual, strict=True)):
        mark = "  " if a == b else "!!"
        shown = step if not callable(step) else getattr(step, "__name__", repr(step))
        lines.append(f"{mark} {i:3} {shown!r}: {labels[0]}={a!r} {labels[1]}={b!r}")
    return "\n".join(lines)


def run_steps_as(
    uid: int, gid: int, root: Path, steps: Sequence[Step], *, umask: int = 0o022
) -> list[Outcome]:
    """``run_steps`` in a forked child running as uid:gid with no supplementary groups."""
    outcomes: list[Outcome] = call_as(uid, gid, lambda: run_steps(root, steps), umask=umask)
    return outcomes


def call_as(uid: int, gid: int, action: Callable[[], Any], *, umask: int = 0o022) -> Any:
    """``action()`` in a forked child running as uid:gid with no supplementary groups (a plain
    user acting on directories that root works on); returns its (picklable) result, and fails
    the test with the child's traceback when it raises.

    A fork rather than a new interpreter: the interpreter may live where that user cannot read
    (a pyenv under /root).
    """
    needs_root("acting as another user (setuid)")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)
            payload = pickle.dumps(action())
        except BaseException:
            payload, status = pickle.dumps(traceback.format_exc()), 1
        with open(write_end, "wb") as out:
            out.write(payload)
        os._exit(status)
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    result = pickle.loads(payload)
    assert os.waitstatus_to_exitcode(status) == 0, f"child as {uid}:{gid} failed:\n{result}"
    return result


# ---------------------------------------------------------------------------------------------
# libc directory streams (Python has no telldir/seekdir).


class _Dirent(ctypes.Structure):
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.restype = None
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.rewinddir.restype = None
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.closedir.argtypes = [ctypes.c_void_p]


class DirStream:
    """opendir/readdir/telldir/seekdir from libc, for tests of readdir offsets."""

    def __init__(self, path: Path) -> None:
        handle = _libc.opendir(os.fsencode(path))
        if not handle:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
        self._dir: int | None = handle

    def __enter__(self) -> DirStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._dir is not None:
            _libc.closedir(self._dir)
            self._dir = None

    def read_entry(self) -> tuple[str, int] | None:
        """The next (name, d_type), or None at the end of the directory."""
        ctypes.set_errno(0)
        entry = _libc.readdir(self._dir)
        if not entry:
            err = ctypes.get_errno()
            if err:
                raise OSError(err, os.strerror(err))
            return None
        return os.fsdecode(entry.contents.d_name), int(entry.contents.d_type)

    def read(self) -> str | None:
        """The next name, or None at the end of the directory."""
        entry = self.read_entry()
        return None if entry is None else entry[0]

    def read_all(self) -> list[str]:
        names = []
        while (name := self.read()) is not None:
            names.append(name)
        return names

    def read_entries(self) -> list[tuple[str, int]]:
        entries = []
        while (entry := self.read_entry()) is not None:
            entries.append(entry)
        return entries

    def read_with_positions(self) -> tuple[list[int], list[str]]:
        """The rest of the names, and the telldir() position before each (and at the end)."""
        positions, names = [], []
        while True:
            positions.append(self.tell())
            name = self.read()
            if name is None:
                return positions, names
            names.append(name)

    def tell(self) -> int:
        return int(_libc.telldir(self._dir))

    def seek(self, position: int) -> None:
        _libc.seekdir(self._dir, position)

    def rewind(self) -> None:
        _libc.rewinddir(self._dir)


# ---------------------------------------------------------------------------------------------
# inotify, to see whether something read a file (IN_ACCESS fires for read, sendfile and
# copy_file_range; not for mmap).

_IN_ACCESS = 0x1
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


class AccessWatch:
    """Counts reads of one real file while it is open."""

    def __init__(self, path: Path) -> None:
        self._fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self._fd, os.fsencode(path), _IN_ACCESS) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, os.strerror(err), str(path))

    def __enter__(self) -> AccessWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def accessed(self) -> bool:
        """Whether a read happened since the last call."""
        seen = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return seen
            seen = seen or bool(data)


# ---------------------------------------------------------------------------------------------
# Mount table.


@dataclass(frozen=True, slots=True)
class MountRecord:
    mount_point: str
    fstype: str
    source: str
    minor: int


def _unescape(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def mount_table() -> list[MountRecord]:
    """/proc/self/mountinfo, in mount order (the last record for a path is the visible one)."""
    records = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fields = left.split()
        fstype, source, *_ = right.split()
        minor = int(fields[2].split(":")[1])
        records.append(MountRecord(_unescape(fields[4]), fstype, _unescape(source), minor))
    return records


def mounted_fstype(path: Path) -> str | None:
    """The type of the topmost filesystem mounted exactly at ``path``, or None."""
    # Resolve the parent only: a stat of a dead FUSE mount point itself would fail.
    target = os.path.join(os.path.realpath(path.parent), path.name)
    found = [r.fstype for r in mount_table() if r.mount_point == target]
    return found[-1] if found else None


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def fuse_device_holders() -> set[int]:
    """Pids of processes with /dev/fuse open: the FUSE daemons on this machine."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == "/dev/fuse":
                        pids.add(int(proc.name))
                        break
    return pids


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie counts: it runs no more code)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return bool(re.search(r"^State:\s+Z", status, re.M))


def injected_env(directory: Path, code: str) -> dict[str, str]:
    """The environment of a daemon that runs ``code`` at startup (a ``sitecustomize`` module put
    in ``directory``, first on its ``PYTHONPATH``): how a test injects a bug or a pause into one
    function of the model, while the daemon and the mount stay real."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(directory),
                                                         os.environ.get("PYTHONPATH")]))}


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(interval)
    return True


def unmount(mnt: Path, *, fuse: bool, timeout: float = 10.0) -> None:
    """Unmount ``mnt`` (retrying while busy); lazily detach it as a last resort and fail."""
    fstype = mounted_fstype(mnt)
    if fstype is None:
        return
    cmd = ["fusermount3", "-u", str(mnt)] if fuse else ["umount", str(mnt)]
    deadline = time.monotonic() + timeout
    last = ""
    while mounted_fstype(mnt) == fstype:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        last = result.stderr.strip()
        if result.returncode == 0 and mounted_fstype(mnt) != fstype:
            return  # the usual case: no pause (a mount and a remount per test add up)
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
            raise AssertionError(f"could not unmount {mnt} ({shlex.join(cmd)}: {last}); detached")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# cowfs mounts.

#: sh, not Python: one starts for every mount (a Python interpreter costs ~50 ms of CPU each).
_WATCHDOG = 'sleep "$0"; exec umount -f "$1" >/dev/null 2>&1'


def start_watchdog(mnt: Path, seconds: float) -> subprocess.Popen[bytes]:
    """A process that aborts the FUSE connection at ``mnt`` (umount -f) after ``seconds``.

    A request that the daemon never answers blocks the test in the kernel, where neither
    pytest-timeout's signal nor anything else in the test process can reach it; aborting the
    connection fails the request and lets the test (and its teardown) run on. A process, not a
    thread, so that forking the test process stays safe; in a session of its own, so that
    stop_watchdog kills its sleep too.
    """
    return subprocess.Popen(
        ["sh", "-c", _WATCHDOG, str(seconds), str(mnt)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_watchdog(watchdog: subprocess.Popen[bytes] | None) -> bool:
    """Stop a watchdog; True if it had already fired."""
    if watchdog is None:
        return False
    fired = watchdog.poll() is not None
    if not fired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(watchdog.pid, signal.SIGKILL)
    watchdog.wait()
    return fired


def find_cowfs() -> Path:
    """The cowfs console script of the interpreter running the tests."""
    path = Path(sys.executable).parent / "cowfs"
    if not path.exists():
        raise AssertionError(
            f"cowfs command not found at {path}: run the tests with the project venv's Python "
            "(make setup; make test), where cowfs is installed."
        )
    return path


def user_allow_other() -> bool:
    """Whether /etc/fuse.conf lets plain users mount with allow_other."""
    try:
        text = Path("/etc/fuse.conf").read_text()
    except OSError:
        return False
    return any(line.strip() == "user_allow_other" for line in text.splitlines())


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


class CowfsMount:
    """One cowfs filesystem: started with ``start``, stopped with ``stop``, ``remount`` between.

    Foreground mode (the default) runs ``cowfs mount -f`` as our child, so its exit status is
    checked. Background mode runs ``cowfs mount`` and ``cowfs umount``, and checks that the daemon
    process is gone when ``cowfs umount`` returns.
    """

    def __init__(
        self,
        lowers: Sequence[Path],
        upper: Path,
        mnt: Path,
        *,
        work: Path | None = None,
        options: Sequence[str] = (),
        foreground: bool = True,
        command: Path | None = None,
        log_dir: Path | None = None,
        watchdog: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.lowers = list(lowers)
        #: Added to the daemon's environment (e.g. COWFS_FAULT for tests/test_faults.py).
        self.env = dict(env or {})
        self.upper = upper
        self.mnt = mnt
        self.work = work
        self.options = tuple(options)
        self.foreground = foreground
        self.cowfs = command or find_cowfs()
        self.log_dir = log_dir or mnt.parent
        self.command = [
            str(self.cowfs),
            "mount",
            *(["-f"] if foreground else []),
            *(["--work", str(work)] if work is not None else []),
            *(["-o", ",".join(options)] if options else []),
            ":".join(str(p) for p in lowers),
            str(upper),
            str(mnt),
        ]
        self.watchdog_seconds = watchdog
        self._watchdog: subprocess.Popen[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        #: Background mode: the processes that opened /dev/fuse while `cowfs mount` ran.
        self.daemon_pids: set[int] = set()
        self.mounted = False
        self.was_mounted = False  # at least one start succeeded
        self._runs = 0
        self._log_path: Path | None = None
        self._log: BinaryIO | None = None

    @property
    def reproducer(self) -> str:
        return shlex.join(self.command)

    def output(self) -> str:
        """What cowfs printed (stdout and stderr) in the current or last run."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"cowfs command: {self.reproducer}\ncowfs output (tail):\n{tail(self.output())}"

    def _fail(self, message: str) -> AssertionError:
        return AssertionError(f"{message}\n{self.describe()}")

    def start(self) -> None:
        assert not self.mounted, "already mounted"
        if "allow_other" in self.options and not user_allow_other():
            needs_root("allow_other (a plain user needs user_allow_other in /etc/fuse.conf)")
        self._runs += 1
        self._log_path = self.log_dir / f"cowfs-{self.mnt.name}-{self._runs}.log"
        self._log = open(self._log_path, "wb")  # noqa: SIM115  (closed in stop)
        if self.foreground:
            self._start_foreground()
        else:
            # Only a background mount's daemon is not our child (a scan of /proc: ~10 ms each).
            # The new holders whose command line names this mount point: another test session
            # may start daemons of its own meanwhile.
            holders_before = fuse_device_holders()
            self._start_background()
            self.daemon_pids = {
                pid for pid in fuse_device_holders() - holders_before
                if str(self.mnt) in _command_line(pid)
            }
        self.mounted = self.was_mounted = True
        if self.watchdog_seconds is not None:
            self._watchdog = start_watchdog(self.mnt, self.watchdog_seconds)

    def _start_foreground(self) -> None:
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env} if self.env else None,
        )

        def ready() -> bool:
            return mounted_fstype(self.mnt) == "fuse.cowfs" or self.proc.poll() is not None

        wait_until(ready, MOUNT_TIMEOUT)
        if mounted_fstype(self.mnt) == "fuse.cowfs":
            return
        status = self.proc.poll()
        if status is None:
            self.proc.kill()
            self.proc.wait()
            self._close_log()
            raise self._fail(f"no fuse.cowfs mount at {self.mnt} after {MOUNT_TIMEOUT}s")
        self._close_log()
        raise self._fail(f"cowfs exited with status {status} before mounting")

    def _start_background(self) -> None:
        try:
            result = subprocess.run(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                timeout=MOUNT_TIMEOUT * 2,
                check=False,
                env={**os.environ, **self.env} if self.env else None,
            )
        except subprocess.TimeoutExpired:
            unmount(self.mnt, fuse=True)
            raise self._fail("cowfs mount (background) did not return") from None
        if result.returncode != 0:
            self._close_log()
            raise self._fail(f"cowfs mount exited with status {result.returncode}")
        if mounted_fstype(self.mnt) != "fuse.cowfs":
            raise self._fail("cowfs mount returned 0 but nothing is mounted yet")

    def stop(self) -> None:
        """Unmount and check that the daemon exited cleanly; always leaves nothing mounted."""
        if not self.mounted:
            return
        self.mounted = False
        fired = stop_watchdog(self._watchdog)
        self._watchdog = None
        try:
            if self.foreground:
                self._stop_foreground()
            else:
                self._stop_background()
        finally:
            self._close_log()
            if fired:  # the root cause of whatever else went wrong
                raise self._fail(
                    f"a request hung for {self.watchdog_seconds}s: the watchdog aborted the "
                    "FUSE connection (umount -f) so that the test could end"
                )
        output = self.output()
        assert "Traceback" not in output, self._fail("cowfs printed a traceback")

    def _stop_foreground(self) -> None:
        assert self.proc is not None
        try:
            unmount(self.mnt, fuse=True)
        finally:
            try:
                status = self.proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise self._fail(f"cowfs did not exit within {EXIT_TIMEOUT}s of unmount") from None
        assert status == 0, self._fail(f"cowfs -f exited with status {status}")

    def _stop_background(self) -> None:
        cmd = [str(self.cowfs), "umount", str(self.mnt)]
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=EXIT_TIMEOUT * 2, check=False
            )
        finally:
            unmount(self.mnt, fuse=True)  # a no-op unless cowfs umount failed
        assert result.returncode == 0, self._fail(f"cowfs umount failed: {result.stderr}")
        assert "Traceback" not in result.stderr, self._fail(f"cowfs umount: {result.stderr}")
        running = {pid for pid in self.daemon_pids if not process_gone(pid)}
        assert not running, self._fail(f"daemon still running after cowfs umount: {running}")

    def detach_dead(self) -> int:
        """Clean up after a daemon that was killed (foreground only): lazily detach its dead
        mount, reap it and return its exit status (-9 after SIGKILL). Never hangs."""
        assert self.foreground, "foreground mounts only"
        assert self.proc is not None, "not started"
        self.mounted = False
        stop_watchdog(self._watchdog)
        self._watchdog = None
        try:
            subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True,
                           timeout=EXIT_TIMEOUT, check=False)
            if mounted_fstype(self.mnt) is not None:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True,
                               timeout=EXIT_TIMEOUT, check=False)
            try:
                return self.proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        finally:
            self._close_log()

    def remount(self) -> None:
        """Unmount (checking a clean exit) and mount again with the same command."""
        self.stop()
        self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def check_layer(self) -> None:
        """Assert that the (unmounted) layers are sound: see :func:`layer_problems`."""
        assert not self.mounted, "check_layer needs the layers unmounted"
        problems = layer_problems(self.upper, self.lowers, self.work)
        if problems:
            raise self._fail("the layer is not sound after unmounting:\n" + "\n".join(problems))


# ---------------------------------------------------------------------------------------------
# The layer check after every mount (as s3ql runs fsck after every test).

#: Why the running test turned the layer check off (the ``layer_check`` marker); empty: it is on.
_LAYER_CHECK_OFF: list[str] = []


@contextlib.contextmanager
def layer_check_disabled(reason: str) -> Iterator[None]:
    """No layer check for the mounts stopped inside the block (a test that builds a broken or
    hostile layer on purpose); conftest.py enters it for tests marked ``layer_check(False)``."""
    _LAYER_CHECK_OFF.append(reason)
    try:
        yield
    finally:
        _LAYER_CHECK_OFF.pop()


def layer_check_enabled() -> bool:
    return not _LAYER_CHECK_OFF


def layer_problems(upper: Path, lowers: Sequence[Path], work: Path | None = None) -> list[str]:
    """What is wrong with an unmounted layer, one line each; empty when it is sound.

    Two checks: ``cowfs check UPPER --lower L1:L2...`` finds nothing (exit status 0 and only its
    "no problems found" line), and the work directory's ``tmp/`` is empty (``--work DIR`` or the
    default ``UPPER/.cowfs-work``; the checker itself looks only at the default one): a clean
    unmount leaves nothing half-built behind.
    """
    from cowfs.core.errors import CowfsError
    from cowfs.tools.check import check

    out = io.StringIO()
    try:
        status = check(upper, list(lowers), repair=False, yes=False, dry_run=False, out=out)
    except CowfsError as e:
        status, out = 2, io.StringIO(f"error: {e}\n")
    problems = []
    if status != 0 or out.getvalue() != f"{upper}: no problems found\n":
        lowers_arg = ":".join(str(p) for p in lowers)
        problems.append(f"cowfs check {upper} --lower {lowers_arg}: exit {status}")
        problems += [f"  {line}" for line in out.getvalue().splitlines()]
    tmp = (work if work is not None else upper / DEFAULT_WORK_NAME) / "tmp"
    with contextlib.suppress(FileNotFoundError):
        problems += [f"left in {tmp}: {name}" for name in sorted(os.listdir(tmp))]
    return problems


@contextlib.contextmanager
def cowfs_mount(
    lowers: Sequence[Path],
    upper: Path,
    mnt: Path,
    *,
    work: Path | None = None,
    options: Sequence[str] = (),
    foreground: bool = True,
    command: Path | None = None,
) -> Iterator[CowfsMount]:
    """A started cowfs mount that is always unmounted, whatever the body does.

    A failure inside the body gets the reproducer command and cowfs's output attached. When the
    body and the unmount succeed, the layer is checked (``CowfsMount.check_layer``) unless the
    running test turned that off (``layer_check_disabled``).
    """
    mount = CowfsMount(
        lowers, upper, mnt, work=work, options=options, foreground=foreground, command=command
    )
    mount.start()
    try:
        yield mount
    except BaseException as exc:
        exc.add_note(mount.describe())
        raise
    finally:
        mount.stop()
    if layer_check_enabled():
        mount.check_layer()


# ---------------------------------------------------------------------------------------------
# The kernel's overlayfs, the reference.

# Spelled out so a machine whose module defaults differ still gives the reference behaviour.
# cowfs renames directories with redirects and keeps lower hard links together with an index,
# so the reference is the kernel doing the same.
KERNEL_DEFAULTS = ("index=on", "redirect_dir=on", "metacopy=off")


class KernelOverlay:
    def __init__(
        self,
        lowers: Sequence[Path],
        upper: Path | None,
        work: Path | None,
        mnt: Path,
        extra_opts: Sequence[str] = (),
    ) -> None:
        self.lowers = list(lowers)
        self.upper = upper
        self.work = work
        self.mnt = mnt
        options = [f"lowerdir={':'.join(str(p) for p in lowers)}"]
        if upper is not None:
            assert work is not None, "an upper needs a work dir"
            options += [f"upperdir={upper}", f"workdir={work}"]
        defaults = KERNEL_DEFAULTS
        if "userxattr" in extra_opts:
            # redirect_dir=off means "follow" when the module has redirect_always_follow, and
            # userxattr refuses to follow redirects.
            defaults = tuple(o for o in defaults if not o.startswith("redirect_dir="))
            defaults += ("redirect_dir=nofollow",)
        options += [*defaults, *extra_opts]
        self.command = ["mount", "-t", "overlay", "overlay", "-o", ",".join(options), str(mnt)]
        self.mounted = False

    @property
    def reproducer(self) -> str:
        return shlex.join(self.command)

    def start(self) -> None:
        needs_root("the kernel's overlayfs (mount -t overlay)")
        result = subprocess.run(self.command, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{self.reproducer} failed: {result.stderr}"
        self.mounted = True

    def stop(self) -> None:
        if self.mounted:
            self.mounted = False
            unmount(self.mnt, fuse=False)

    def remount(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def kernel_overlay(
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    mnt: Path,
    extra_opts: Sequence[str] = (),
) -> Iterator[KernelOverlay]:
    overlay = KernelOverlay(lowers, upper, work, mnt, extra_opts)
    overlay.start()
    try:
        yield overlay
    except BaseException as exc:
        exc.add_note(f"kernel overlay: {overlay.reproducer}")
        raise
    finally:
        overlay.stop()


@contextlib.contextmanager
def scratch_mount(fstype: str, mnt: Path, options: str = "") -> Iterator[Path]:
    """A tmpfs or ramfs at ``mnt`` (under a temporary directory), always unmounted."""
    needs_root(f"mount -t {fstype}")
    cmd = ["mount", "-t", fstype, *(["-o", options] if options else []), fstype, str(mnt)]
    subprocess.run(cmd, check=True, capture_output=True)
    try:
        yield mnt
    finally:
        unmount(mnt, fuse=False)


# ---------------------------------------------------------------------------------------------
# Differential runs.


class Twin:
    """The same layers under the kernel's overlayfs (reference) and under cowfs (subject)."""

    def __init__(self, reference: Any, subject: Any, labels=("kernel", "cowfs")) -> None:
        self.reference = reference
        self.subject = subject
        self.labels = labels

    def apply(self, steps: Sequence[Step]) -> list[Outcome]:
        """Run ``steps`` on both; assert equal outcomes and equal merged views."""
        expected = run_steps(self.reference.mnt, steps)
        actual = run_steps(self.subject.mnt, steps)
        assert expected == actual, "outcomes differ:\n" + format_outcomes(
            steps, expected, actual, self.labels
        )
        self.assert_same_view()
        return actual

    def assert_same_view(self, when: str = "") -> None:
        assert_same_tree(
            merged_view(self.reference.mnt),
            merged_view(self.subject.mnt),
            f"merged views {when}".strip(),
            self.labels,
        )

    def remount_and_compare(self) -> None:
        """Remount the subject: what it showed must have been persisted in its upper."""
        self.subject.remount()
        self.assert_same_view("after remounting " + self.labels[1])


def getxattr_or_none(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


def is_whiteout(path: Path) -> bool:
    """A whiteout as cowfs writes it: the kernel's 0/0 character device, or (on an upper without
    RENAME_WHITEOUT) an empty regular file with user.overlay.whiteout in a directory marked x."""
    st = os.lstat(path)
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True
    return (
        stat.S_ISREG(st.st_mode)
        and st.st_size == 0
        and getxattr_or_none(path, WHITEOUT_XATTR) == b""
        and getxattr_or_none(path.parent, OPAQUE_XATTR) == b"x"
    )
