"""Running cowfs mounts, seen from outside the daemon: state files, the mount table, unmounting,
finding the layers of a mount or of an upper, and exclusive use of an upper (unmounting is
:mod:`cowfs.core.lifecycle`).

Free of pyfuse3 and trio: the daemon (:mod:`cowfs.daemon.mount`) writes the state files with the
functions here, and the command line, the Python API and the offline tools read them.

Each running mount has a state file (:class:`cowfs.core.schema.MountState`) in :func:`state_dir`. A
mount is *alive* when its state file names a live daemon and the mount table has a ``fuse.cowfs``
mount at its mountpoint. An upper is *in use* while a daemon holds the ``flock`` on it (every mount
locks its upper and its work directory, see :mod:`cowfs.core.layers`); the tools that change an
upper take the same lock on the upper for as long as they change it, so that nothing can mount it
meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import schema, upperinfo
from .errors import CowfsError
from .layers import parse_lowers

log = logging.getLogger(__name__)

# --- the mount table -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    fstype: str
    #: ``major:minor`` of the mounted filesystem.
    device: str
    #: The mount's own flags (``rw,nosuid,nodev,relatime``).
    options: str = ""


def _unescape(field: bytes) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def mount_table() -> list[MountEntry]:
    """Every mount this process sees, in mount order."""
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            fstype = os.fsdecode(fields[fields.index(b"-") + 1])
            found.append(MountEntry(_unescape(fields[4]), fstype, os.fsdecode(fields[2]),
                                    os.fsdecode(fields[5])))
    return found


def fuse_mounts_at(path: Path) -> list[MountEntry]:
    """The FUSE mounts exactly at ``path``, the topmost last."""
    return [m for m in mount_table() if m.fstype.startswith("fuse") and m.mountpoint == str(path)]


def fuse_mount_at(path: Path) -> str | None:
    """The filesystem type mounted exactly at ``path`` if it is a FUSE mount, else None."""
    found = fuse_mounts_at(path)
    return found[0].fstype if found else None


def refuse_root_mountpoint(path: Path) -> None:
    """Refuse to mount over ``/``: fusermount3 cannot unmount it ("invalid abs path": it
    unmounts a name in its parent directory, and ``/`` has none), so the mount and its daemon
    would stay behind. Any path that resolves to ``/`` (``//``, ``/..``, a symlink) is ``/``."""
    if os.path.realpath(path) == "/":
        raise CowfsError(f"cannot mount over {str(path)!r}: it is the root directory, which "
                         "fusermount3 cannot unmount again; mount the view somewhere below it "
                         "(e.g. cowfs run --at /mnt/view)")


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` runs (a daemon that was killed does not, even while nobody has
    reaped it: a zombie)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return status[status.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def mount_flags(path: Path) -> tuple[str, ...]:
    """The flags of the topmost cowfs mount at ``path`` (``rw``, ``nosuid``, ...), or ()."""
    found = [m for m in mount_table() if m.fstype == "fuse.cowfs" and m.mountpoint == str(path)]
    return tuple(found[-1].options.split(",")) if found else ()


def cowfs_mountpoints() -> list[str]:
    """Where fuse.cowfs filesystems are mounted, in mount order."""
    return [m.mountpoint for m in mount_table() if m.fstype == "fuse.cowfs"]


# --- state files ---------------------------------------------------------------------------------


#: Overrides where state files (and background daemons' default logs) are kept: the tests give
#: each session its own, so that mounts elsewhere on the machine do not count.
STATE_DIR_ENV = "COWFS_STATE_DIR"


def state_dir() -> Path:
    given = os.environ.get(STATE_DIR_ENV)
    if given:
        return Path(given)
    if os.geteuid() == 0:
        return Path("/run/cowfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "cowfs" if runtime else Path(f"/tmp/cowfs-{os.geteuid()}")


def state_file(mountpoint: Path) -> Path:
    return state_dir() / (urllib.parse.quote(str(mountpoint), safe="") + schema.STATE_FILE_SUFFIX)


def log_file(mountpoint: Path) -> Path:
    """Where a background daemon logs unless told otherwise (``--log``): beside its state file,
    which it outlives (a daemon that was killed left its last lines there)."""
    return state_dir() / (urllib.parse.quote(str(mountpoint), safe="") + ".log")


def write_state(state: schema.MountState) -> Path:
    """Write (or replace) the state file of ``state.mountpoint``, atomically."""
    path = state_file(Path(state.mountpoint))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(state.to_json(), encoding="utf-8")
    os.replace(temp, path)
    return path


def load_state(mountpoint: Path) -> schema.MountState | None:
    try:
        return schema.MountState.from_json(state_file(mountpoint).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- running mounts ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunningMount:
    """A cowfs mount on this machine, from its state file, checked against the mount table."""

    pid: int
    mountpoint: Path
    lowers: tuple[Path, ...]
    upper: Path
    work: Path
    #: False when the state file outlived its daemon or its mount (a crash).
    alive: bool
    #: Whether the mount table has a cowfs mount at the mountpoint (alive or dead).
    mounted: bool = False


def _state_dirs() -> list[Path]:
    dirs = [state_dir()]
    # Root sees the other users' mounts too (not with a state directory of its own).
    if os.geteuid() == 0 and not os.environ.get(STATE_DIR_ENV):
        dirs += sorted(Path("/run/user").glob("*/cowfs")) + sorted(Path("/tmp").glob("cowfs-*"))
    return dirs


def running_mounts() -> list[RunningMount]:
    """Every mount with a state file, sorted by mountpoint."""
    mounted = set(cowfs_mountpoints())
    found = []
    for directory in _state_dirs():
        with contextlib.suppress(OSError):
            for path in sorted(directory.glob("*" + schema.STATE_FILE_SUFFIX)):
                try:
                    state = schema.MountState.from_json(path.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    continue
                alive = (state.mountpoint in mounted and process_exists(state.pid)
                         and state.error is None)
                found.append(RunningMount(state.pid, Path(state.mountpoint),
                                          tuple(Path(p) for p in state.lowers),
                                          Path(state.upper), Path(state.work), alive,
                                          state.mountpoint in mounted))
    return sorted(found, key=lambda m: str(m.mountpoint))


def mount_at(path: Path) -> RunningMount | None:
    real = path.resolve()
    for mount in running_mounts():
        if mount.alive and mount.mountpoint == real:
            return mount
    return None


def mounts_of_upper(upper: Path) -> list[RunningMount]:
    real = upper.resolve()
    return [m for m in running_mounts() if m.alive and m.upper == real]


def is_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def reachable_layer(mount: RunningMount, layer: Path) -> Path:
    """A path that reaches ``layer`` itself even when the mount hides it (a mount over its own
    base): the daemon's descriptor for the layer root, through /proc (root, or the same user)."""
    if not is_inside(layer, mount.mountpoint):
        return layer
    fuse_dev = os.stat(mount.mountpoint).st_dev
    fd_dir = Path(f"/proc/{mount.pid}/fd")
    with contextlib.suppress(OSError):
        for fd in sorted(fd_dir.iterdir(), key=lambda p: int(p.name)):
            with contextlib.suppress(OSError):
                if os.readlink(fd) != str(layer):
                    continue
                st = os.stat(fd)
                if stat.S_ISDIR(st.st_mode) and st.st_dev != fuse_dev:
                    return fd
    raise CowfsError(f"layer {str(layer)!r} is hidden by the mount at {str(mount.mountpoint)!r} "
                     "and its daemon's descriptors cannot be read (run as root)")


# --- the layers named on a command line ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layers:
    """An upper, its lowers and its work directory, ready to walk."""

    upper: Path
    lowers: tuple[Path, ...]
    #: The work directory whose hard-link index serves some names (``--work`` of the mount).
    work: Path
    mount: RunningMount | None = None


def work_of(upper: Path) -> Path:
    """The work directory of an unmounted upper: the one recorded at its last mount when it is
    verifiably that upper's (:func:`cowfs.core.upperinfo.recorded_work`), else the default."""
    return upperinfo.recorded_work(upper) or schema.default_work_dir(upper)


def layers_for(target: str, lower: str | None) -> Layers:
    """The layers named by ``UPPER|MOUNTPOINT`` (and ``--lower``): those of the running mount,
    else the lowers given, else those recorded on the upper at its last mount."""
    path = Path(target)
    if not path.exists():
        raise CowfsError(f"{target!r} does not exist")
    if not path.is_dir():
        raise CowfsError(f"{target!r} is not a directory")
    mount = mount_at(path)
    if mount is None:
        running = mounts_of_upper(path)
        mount = running[0] if running else None
    if mount is not None:
        lowers = parse_lowers(lower) if lower else mount.lowers
        return Layers(reachable_layer(mount, mount.upper),
                      tuple(reachable_layer(mount, p) for p in lowers),
                      reachable_layer(mount, mount.work), mount)
    if lower:
        return Layers(path, parse_lowers(lower), work_of(path))
    record = upperinfo.recorded_stack(path)
    if record is not None:
        return Layers(path, tuple(Path(i.path) for i in record.lowers), work_of(path))
    raise CowfsError(f"{target!r} is not a cowfs mountpoint, a mounted upper or an upper with a "
                     "recorded lower stack: give its lower layers with --lower LOWER[:LOWER...]")


# --- exclusive use of an upper -------------------------------------------------------------------


def refuse_if_mounted(path: Path, what: str) -> None:
    """Refuse to ``what`` a directory that is an upper of a live mount, or a live view."""
    for mount in mounts_of_upper(path):
        raise CowfsError(f"cannot {what}: {str(path)!r} is the upper of the cowfs mount at "
                         f"{str(mount.mountpoint)!r}; unmount it first "
                         f"('cowfs umount {mount.mountpoint}')")
    real = path.resolve()
    if str(real) in cowfs_mountpoints():
        raise CowfsError(f"cannot {what}: {str(path)!r} is a cowfs mountpoint (the live view, "
                         "not an upper); give the upper directory, and unmount it first")


@contextlib.contextmanager
def exclusive_upper(upper: Path, what: str) -> Iterator[None]:
    """Hold the upper's lock (the one every cowfs mount holds on its upper) while changing it;
    refuse with a clear error while it is mounted or is a mountpoint."""
    if not upper.is_dir():
        raise CowfsError(f"upper directory {str(upper)!r} does not exist"
                         if not upper.exists() else f"upper {str(upper)!r} is not a directory")
    refuse_if_mounted(upper, what)
    fd = os.open(upper, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CowfsError(f"cannot {what}: {_lock_holder(fd, upper)}") from None
        yield
    finally:
        os.close(fd)


def _lock_holder(fd: int, upper: Path) -> str:
    """Who holds the lock on the upper open at ``fd``: another command, or a mount's daemon
    (from /proc/locks, which names the process that took each lock)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode \
                    and fields[4].isdigit():
                pid = int(fields[4])
                words = _command_words(pid)
                if not any(w == "mount" or w.endswith("mount.fuse.cowfs") for w in words):
                    command = next((w for w in words if w in _LOCKING_COMMANDS), "command")
                    return (f"another cowfs {command} (pid {pid}) is working on {str(upper)!r}; "
                            "wait for it to finish")
                return f"{str(upper)!r} is in use by the cowfs mount of pid {pid}; unmount it first"
    return f"{str(upper)!r} is in use by a cowfs mount; unmount it first"


#: The commands that take the upper's lock, as they appear on a command line.
_LOCKING_COMMANDS = ("commit", "reset", "check")


def _command_words(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
