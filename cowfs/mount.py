"""Mount options and the daemon's lifecycle: open the layers, mount, serve, unmount, clean up.

The lifecycle is one ``ExitStack``: whatever was set up is torn down in reverse order, also after an
error. SIGINT and SIGTERM end the main loop through ``pyfuse3.terminate()``, and the filesystem is
then unmounted by the daemon itself.

Each running mount has a small state file (pid, mountpoint, layers) so that ``cowfs umount`` can
wait for the daemon to exit and other tools can list the mounts.

Caching, chosen by measurement (docs/performance.md): the kernel may keep names, attributes and
negative lookups for ``timeout`` seconds, a day by default. That is safe because every change
to the layers goes through cowfs while it is mounted, and the kernel drops what a change through
the mount makes stale; changing a layer behind cowfs's back is not supported (``timeout=0`` makes
such changes visible at once, at a large cost). A daemon running as root raises the mount's
readahead to the largest request size. The kernel's writeback cache is off unless ``-o writeback``
(experimental): it gathers small writes into large requests (2x faster for 4 KiB writes) but
gained nothing on the benchmark's workloads, and with it ``close`` of a lower file unlinked while
open fails with EIO (the kernel sends the times, and the object has no name left to copy up to).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import resource
import signal
import stat
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyfuse3
import trio

from . import fusecheck
from .errors import CowfsError
from .layers import LayerPaths, LayerStack, check_mountpoint_outside, open_stack
from .operations import Operations
from .vfs import Overlay

log = logging.getLogger(__name__)

#: Generic mount(8) options that only make sense to mount(8) itself.
IGNORED_OPTIONS = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users",
                             "nouser", "owner", "group", "rw"})
#: Options handed to the kernel through libfuse unchanged.
KERNEL_OPTIONS = frozenset({"ro", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "noatime",
                            "atime", "relatime", "nodiratime", "sync", "async", "dirsync"})
#: A day: the kernel may cache names and attributes that long (see the module docstring).
DEFAULT_TIMEOUT = 86400.0
#: Readahead of the mount in KiB: the largest read request (libfuse's 1 MiB max_pages). The kernel
#: offers 128 KiB at INIT and a FUSE daemon may only lower that there; root can raise it in sysfs
#: afterwards. Sequential reads then take 8x fewer requests (3x faster cold, measured).
READAHEAD_KIB = 1024


@dataclass(frozen=True, slots=True)
class MountOptions:
    """What ``-o`` said."""

    allow_other: bool = False
    debug: bool = False
    timeout: float = DEFAULT_TIMEOUT
    volatile: bool = False
    kernel: frozenset[str] = field(default_factory=frozenset)
    writeback: bool = False

    @property
    def read_only(self) -> bool:
        return "ro" in self.kernel

    @classmethod
    def parse(cls, specs: list[str]) -> MountOptions:
        """Parse ``-o a,b=c`` strings (given once or several times)."""
        allow_other = debug = volatile = writeback = False
        timeout = DEFAULT_TIMEOUT
        kernel: set[str] = set()
        for spec in specs:
            for opt in filter(None, spec.split(",")):
                key, _, value = opt.partition("=")
                if key == "allow_other":
                    allow_other = True
                elif key == "debug":
                    debug = True
                elif key == "volatile":
                    volatile = True
                elif key in ("writeback", "nowriteback"):
                    writeback = key == "writeback"
                elif key == "timeout":
                    timeout = _parse_timeout(value)
                elif key in KERNEL_OPTIONS:
                    kernel.add(key)
                elif key not in IGNORED_OPTIONS:
                    raise CowfsError(f"unknown mount option {opt!r} (see 'cowfs mount --help')")
        return cls(allow_other, debug, timeout, volatile, frozenset(kernel), writeback)

    def fuse_options(self, source: str) -> set[str]:
        opts = set(pyfuse3.default_options) | {f"fsname={source}", "subtype=cowfs"} | self.kernel
        if self.allow_other:
            opts.add("allow_other")
        if self.debug:
            opts.add("debug")
        return opts


def _parse_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise CowfsError(f"invalid timeout {value!r}: give a number of seconds, e.g. timeout=1")
    return seconds


# --- mountpoint checks and state files ---------------------------------------------------------


def _unescape_mountinfo(field: bytes) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def _fuse_mounts_at(path: Path) -> list[tuple[str, str]]:
    """(filesystem type, ``major:minor``) of the FUSE mounts at ``path``, the topmost last."""
    target = str(path)
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            fstype = os.fsdecode(fields[fields.index(b"-") + 1])
            if fstype.startswith("fuse") and _unescape_mountinfo(fields[4]) == target:
                found.append((fstype, os.fsdecode(fields[2])))
    return found


def fuse_mount_at(path: Path) -> str | None:
    """The filesystem type mounted exactly at ``path`` if it is a FUSE mount, else None."""
    found = _fuse_mounts_at(path)
    return found[0][0] if found else None


def raise_readahead(mountpoint: Path, kib: int = READAHEAD_KIB) -> None:
    """Set the readahead of our mount (its bdi); only root may, so failing is not an error.

    Called after the kernel has processed INIT, which would otherwise lower it again.
    """
    try:
        found = _fuse_mounts_at(mountpoint)
        if found:
            Path(f"/sys/class/bdi/{found[-1][1]}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as e:
        log.debug("readahead of %s left as it is: %s", mountpoint, e)


def check_mountpoint(path: Path) -> Path:
    try:
        st = os.stat(path)
    except OSError as e:
        raise CowfsError(f"mountpoint {str(path)!r}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CowfsError(f"mountpoint {str(path)!r} is not a directory")
    real = path.resolve()
    found = fuse_mount_at(real)
    if found is not None:
        raise CowfsError(f"mountpoint {str(path)!r} is already mounted ({found}); "
                         f"unmount it first with 'cowfs umount {path}'")
    return real


def state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/cowfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "cowfs" if runtime else Path(f"/tmp/cowfs-{os.geteuid()}")


def state_file(mountpoint: Path) -> Path:
    return state_dir() / (urllib.parse.quote(str(mountpoint), safe="") + ".json")


@dataclass(frozen=True, slots=True)
class MountState:
    """What ``cowfs umount`` (and ``cowfs status``) need to know about a running mount."""

    pid: int
    mountpoint: str
    lowers: list[str]
    upper: str
    work: str
    #: Set by a daemon that ended with an error; a clean exit removes the state file instead.
    error: str | None = None

    @classmethod
    def load(cls, mountpoint: Path) -> MountState | None:
        try:
            data = json.loads(state_file(mountpoint).read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None


@contextlib.contextmanager
def _state_recorded(mountpoint: Path, paths: LayerPaths, stack: LayerStack) -> Iterator[None]:
    path = state_file(mountpoint)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    state = MountState(os.getpid(), str(mountpoint), [str(p) for p in paths.lowers],
                       str(paths.upper), str(stack.work.path))
    path.write_text(json.dumps(dataclasses.asdict(state)), encoding="utf-8")
    try:
        yield
    except BaseException as e:
        failed = dataclasses.replace(state, error=f"{type(e).__name__}: {e}")
        path.write_text(json.dumps(dataclasses.asdict(failed)), encoding="utf-8")
        raise
    path.unlink()


# --- serving -----------------------------------------------------------------------------------


def _raise_fd_limit() -> None:
    """Every inode the kernel holds keeps a descriptor per layer: allow as many as we may."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or os.geteuid() == 0:
        with contextlib.suppress(OSError, ValueError):
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            resource.setrlimit(resource.RLIMIT_NOFILE, (nr_open, nr_open))
            return
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve_until_unmounted() -> bool:
    """Run the FUSE loop; return True when it ended by a signal (we must unmount ourselves)."""
    signalled = False
    async with trio.open_nursery() as nursery:

        async def stop_on_signal() -> None:
            nonlocal signalled
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info("received %s, unmounting", signal.Signals(signum).name)
                    signalled = True
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    return signalled


def serve(paths: LayerPaths, stack: LayerStack, mountpoint: Path, options: MountOptions,
          ready: Callable[[], None]) -> None:
    """Mount ``stack`` at ``mountpoint`` and serve until unmounted. Calls ``ready`` once mounted."""
    os.umask(0)  # modes of new objects are exactly what the caller asked for
    _raise_fd_limit()
    with contextlib.ExitStack() as cleanup:
        overlay = Overlay(stack, sync=not options.volatile)
        cleanup.callback(overlay.close)
        operations = Operations(overlay, timeout=options.timeout, writeback=options.writeback,
                                after_init=lambda: raise_readahead(mountpoint))
        fusecheck.init(operations, str(mountpoint), options.fuse_options("cowfs"))
        unmount = True
        cleanup.callback(lambda: pyfuse3.close(unmount=unmount))
        cleanup.enter_context(_state_recorded(mountpoint, paths, stack))
        log.info("mounted %s (upper %s, lowers %s)", mountpoint, paths.upper,
                 ":".join(map(str, paths.lowers)))
        ready()
        unmount = trio.run(_serve_until_unmounted)
    log.info("unmounted %s", mountpoint)


def prepare(paths: LayerPaths, mountpoint: Path, *,
            read_only: bool = False) -> tuple[LayerPaths, LayerStack, Path]:
    """Everything that can fail because of user input, done before forking into the background.

    Returns the layer paths resolved (nothing may resolve a path once mounted: the mountpoint may
    be a layer's own path), the opened stack, and the resolved mountpoint.
    """
    real_mountpoint = check_mountpoint(mountpoint)
    resolved = paths.resolved()
    check_mountpoint_outside(resolved, real_mountpoint)
    return resolved, open_stack(resolved, read_only=read_only), real_mountpoint
