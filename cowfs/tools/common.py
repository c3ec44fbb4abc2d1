"""What the tools share: finding the layers of a mount, refusing a mounted upper, plans and
confirmation, and a progress bar that shows only on a terminal.

Destructive tools compute a plan first and apply it only when asked (``--yes``, or a "y" typed at a
terminal), as overlayfs-tools do. An upper is "in use" while a cowfs daemon holds the lock on its
work directory (see :mod:`cowfs.layers`); the tools take that same lock for as long as they change
the upper, so that nothing can mount it meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .. import realfs, schema
from ..errors import CowfsError

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


def cowfs_mountpoints() -> list[str]:
    """Where fuse.cowfs filesystems are mounted, in mount order."""
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if fields[fields.index(b"-") + 1] == b"fuse.cowfs":
                # mountinfo escapes space, tab, newline and backslash as 3 octal digits.
                found.append(os.fsdecode(re.sub(rb"\\([0-7]{3})",
                                                lambda m: bytes([int(m.group(1), 8)]), fields[4])))
    return found


def _state_dirs() -> list[Path]:
    from ..mount import state_dir  # imports pyfuse3: only where it is needed

    dirs = [state_dir()]
    if os.geteuid() == 0:  # root sees the other users' mounts too
        dirs += sorted(Path("/run/user").glob("*/cowfs")) + sorted(Path("/tmp").glob("cowfs-*"))
    return dirs


def running_mounts() -> list[RunningMount]:
    """Every mount with a state file (see :class:`cowfs.mount.MountState`), sorted by mountpoint."""
    mounted = set(cowfs_mountpoints())
    found = []
    for directory in _state_dirs():
        with contextlib.suppress(OSError):
            for path in sorted(directory.glob("*.json")):
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                    pid, mnt = int(data["pid"]), str(data["mountpoint"])
                    lowers = tuple(Path(p) for p in data["lowers"])
                    upper, work = Path(data["upper"]), Path(data["work"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                alive = (mnt in mounted and Path(f"/proc/{pid}").exists()
                         and not data.get("error"))
                found.append(RunningMount(pid, Path(mnt), lowers, upper, work, alive))
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


def _is_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def reachable_layer(mount: RunningMount, layer: Path) -> Path:
    """A path that reaches ``layer`` itself even when the mount hides it (a mount over its own
    base): the daemon's descriptor for the layer root, through /proc (root, or the same user)."""
    if not _is_inside(layer, mount.mountpoint):
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


def parse_lowers(spec: str) -> list[Path]:
    names = spec.split(":")
    if not spec or any(not n for n in names):
        raise CowfsError(f"invalid lower directory list {spec!r}: empty element")
    return [Path(n) for n in names]


@dataclass(frozen=True, slots=True)
class Layers:
    """An upper and its lowers, ready to walk."""

    upper: Path
    lowers: tuple[Path, ...]
    mount: RunningMount | None = None


def layers_for(target: str, lower: str | None) -> Layers:
    """The layers named by ``UPPER|MOUNTPOINT`` (and ``--lower``)."""
    path = Path(target)
    if not path.exists():
        raise CowfsError(f"{target!r} does not exist")
    if not path.is_dir():
        raise CowfsError(f"{target!r} is not a directory")
    mount = mount_at(path)
    if mount is not None:
        lowers = tuple(parse_lowers(lower)) if lower else mount.lowers
        return Layers(reachable_layer(mount, mount.upper),
                      tuple(reachable_layer(mount, p) for p in lowers), mount)
    if lower:
        return Layers(path, tuple(parse_lowers(lower)))
    running = mounts_of_upper(path)
    if running:
        mount = running[0]
        return Layers(path, tuple(reachable_layer(mount, p) for p in mount.lowers), mount)
    raise CowfsError(f"{target!r} is not a cowfs mountpoint or a mounted upper: give its lower "
                     "layers with --lower LOWER[:LOWER...]")


# --- exclusive use of an upper -------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_upper(upper: Path, what: str) -> Iterator[None]:
    """Hold the upper's work-directory lock (the one every cowfs mount holds) while changing it;
    refuse with a clear error while it is mounted."""
    if not upper.is_dir():
        raise CowfsError(f"upper directory {str(upper)!r} does not exist"
                         if not upper.exists() else f"upper {str(upper)!r} is not a directory")
    for mount in mounts_of_upper(upper):
        raise CowfsError(f"cannot {what}: {str(upper)!r} is the upper of the cowfs mount at "
                         f"{str(mount.mountpoint)!r}; unmount it first "
                         f"('cowfs umount {mount.mountpoint}')")
    work = upper / schema.WORK_DIR_NAME
    if not work.is_dir() or work.is_symlink():
        yield
        return
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CowfsError(f"cannot {what}: {str(upper)!r} is in use by a cowfs mount; unmount "
                             "it first") from None
        yield
    finally:
        os.close(fd)


def _open_dir_nofollow(dirfd: int, name: str) -> int:
    return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)


@contextlib.contextmanager
def parent_of(root_fd: int, path: str) -> Iterator[tuple[int, str]]:
    """The parent directory of ``path`` under ``root_fd``, reached without following symlinks."""
    *dirs, name = path.split("/")
    fd = os.dup(root_fd)
    try:
        for component in dirs:
            child = _open_dir_nofollow(fd, component)
            os.close(fd)
            fd = child
        yield fd, name
    finally:
        os.close(fd)


def remove_if_present(dirfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        realfs.remove_tree(dirfd, name)


# --- plans ---------------------------------------------------------------------------------------


def confirm(plan: Sequence[str], *, yes: bool, dry_run: bool, question: str,
            out: TextIO | None = None) -> bool:
    """Show ``plan``; True when it is to be applied. Raises when nobody said yes."""
    out = out or sys.stdout
    for line in plan:
        print(line, file=out)
    if dry_run:
        return False
    if yes:
        return True
    if sys.stdin.isatty() and out.isatty():
        try:
            answer = input(f"{question} [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() in ("y", "yes"):
            return True
        raise CowfsError("cancelled; nothing was changed")
    raise CowfsError("not applied: pass --yes to apply this plan (or --dry-run to only show it)")


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr, only when stderr is a terminal (tqdm's when it is installed)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total = max(total, 1)
        self.label = label
        self.done = 0
        self.enabled = self.stream.isatty() and total > 0
        self._tqdm: object | None = None
        if self.enabled:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]

                self._tqdm = tqdm(total=total, desc=label, unit="obj", file=self.stream,
                                  leave=False)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.update(n)  # type: ignore[attr-defined]
            return
        width = 30
        filled = width * min(self.done, self.total) // self.total
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{self.done}/{self.total}")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()  # type: ignore[attr-defined]
            return
        self.stream.write("\r\x1b[K")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def relative_path(path: str) -> str:
    """A user-given path inside the view, normalised; refuses anything that leaves it."""
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise CowfsError(f"path {path!r} leaves the layer ('..' is not allowed)")
    return "/".join(parts) or "."
