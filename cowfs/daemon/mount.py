"""Mount options and the daemon's lifecycle: open the layers, mount, serve, unmount, clean up.

The lifecycle is one ``ExitStack``: whatever was set up is torn down in reverse order, also after an
error. SIGINT and SIGTERM end the main loop through ``pyfuse3.terminate()``, and the filesystem is
then unmounted by the daemon itself. Where pyfuse3 has ``patches/pyfuse3/0003``, the loop runs
handlers inline (:func:`inline_loop`; ``COWFS_LOOP=stock`` runs pyfuse3's own loop instead).

Each running mount has a small state file (:class:`cowfs.core.schema.MountState`, written with
:mod:`cowfs.core.mounts`) so that ``cowfs umount`` can wait for the daemon to exit and other tools
can list the mounts. A read-write mount records its lower stack on the upper, and a mount over
another stack than the recorded one is refused unless ``-o relocate`` (:mod:`cowfs.core.upperinfo`).

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
import ctypes
import dataclasses
import inspect
import logging
import os
import resource
import select
import signal
import stat
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from ..core import mounts, partial, realfs
from ..core.errors import CowfsError
from ..core.layers import LayerPaths, LayerStack, check_mountpoint_outside, open_stack
from ..core.libc import libc
from ..core.schema import MountState
from . import fusecheck
from .inodes import collect_less
from .operations import Operations
from .vfs import Overlay

log = logging.getLogger(__name__)

#: Generic mount(8) options that only make sense to mount(8) itself.
IGNORED_OPTIONS = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users",
                             "nouser", "owner", "group", "rw"})
#: The kernel's overlayfs spells some options its own way (Documentation/filesystems/
#: overlayfs.rst): an fstab line converted from ``overlay`` to ``fuse.cowfs`` keeps them. Each maps
#: to cowfs's option ("" where cowfs always behaves so and there is nothing to set), or, where
#: cowfs cannot behave so, to the reason it refuses.
KERNEL_SPELLINGS: dict[str, str] = {
    "metacopy=on": "metacopy", "metacopy=off": "nometacopy",
    "default_permissions": "",  # always set (the kernel checks access against cowfs's attributes)
    "userxattr": "",  # cowfs's records are always user.* xattrs
    "index=on": "", "redirect_dir=on": "", "redirect_dir=follow": "",  # always
    "xino=on": "", "xino=auto": "", "xino=off": "",  # inode numbers are always stable
    "nfs_export=off": "", "uuid=on": "", "uuid=auto": "", "uuid=null": "", "uuid=off": "",
}
KERNEL_REFUSED: dict[str, str] = {
    "index=off": "cowfs always keeps the hard-link index (hard links stay one file on copy-up)",
    "redirect_dir=off": "cowfs always records and follows redirects of renamed directories",
    "redirect_dir=nofollow": "cowfs always records and follows redirects of renamed directories",
    "nfs_export=on": "cowfs cannot serve NFS (FUSE lookups by file handle are not supported)",
}
#: Options handed to the kernel through libfuse unchanged.
KERNEL_OPTIONS = frozenset({"ro", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync",
                            "async", "dirsync"})
#: The access-time policy of the mount (one of them; the last given wins). libfuse knows only
#: ``noatime``; ``relatime`` is what every new mount gets; ``strictatime`` is set after mounting.
ATIME_OPTIONS = frozenset({"atime", "noatime", "relatime", "strictatime"})
#: ``mount_setattr(2)``: the call and the flags of ``struct mount_attr`` (linux/mount.h).
SYS_MOUNT_SETATTR = 442  # the same on every architecture (after the syscall table unification)
MOUNT_ATTR_ATIME_MASK = 0x70
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
#: A day: the kernel may cache names and attributes that long (see the module docstring).
DEFAULT_TIMEOUT = 86400.0
#: Readahead of the mount in KiB: the largest read request (libfuse's 1 MiB max_pages). The kernel
#: offers 128 KiB at INIT and a FUSE daemon may only lower that there; root can raise it in sysfs
#: afterwards. Sequential reads then take 8x fewer requests (3x faster cold, measured).
READAHEAD_KIB = 1024
AT_FDCWD = -100


@dataclass(frozen=True, slots=True)
class MountOptions:
    """What ``-o`` said."""

    allow_other: bool = False
    debug: bool = False
    timeout: float = DEFAULT_TIMEOUT
    volatile: bool = False
    kernel: frozenset[str] = field(default_factory=frozenset)
    writeback: bool = False
    #: The layers were moved on purpose: accept a stack other than the one recorded on the upper.
    relocate: bool = False
    #: ``noatime``, ``relatime`` (the default) or ``strictatime``.
    atime: str = "relatime"
    nodiratime: bool = False
    #: Metadata changes of lower files copy no data (``metacopy``, on by default as partial
    #: copy-up is; ``nometacopy`` keeps a live upper the kernel's overlayfs can mount, which it
    #: refuses with metacopy files in userxattr mode; frozen layers always can: layer-format.md
    #: 11a and 17).
    metacopy: bool = True
    #: Lower regular files of at least this many bytes copy up only the blocks written
    #: (``partial_copyup=SIZE``; 0, ``nopartial_copyup``: never; see cowfs.core.partial).
    partial_min: int = partial.DEFAULT_MIN_SIZE

    @property
    def noatime(self) -> bool:
        return self.atime == "noatime"

    @property
    def set_after_mount(self) -> bool:
        """Whether some flag is set with mount_setattr(2) once mounted (root only)."""
        return self.atime == "strictatime" or self.nodiratime

    @property
    def read_only(self) -> bool:
        return "ro" in self.kernel

    @classmethod
    def parse(cls, specs: list[str]) -> MountOptions:
        """Parse ``-o a,b=c`` strings (given once or several times), one row of :data:`FLAGS`
        or :data:`VALUED` an option (the last given wins), as the kernel's params.c does."""
        fields: dict[str, Any] = {}  # checked by the tables' rows
        kernel: set[str] = set()
        for spec in specs:
            for given in filter(None, spec.split(",")):
                if given in KERNEL_REFUSED:
                    raise CowfsError(f"mount option {given!r} is not supported: "
                                     f"{KERNEL_REFUSED[given]}")
                opt = KERNEL_SPELLINGS.get(given, given)
                key, has_value, value = opt.partition("=")
                if not key or (key in IGNORED_OPTIONS and not has_value):
                    continue
                if key in FLAGS and not has_value:
                    name, setting = FLAGS[key]
                    fields[name] = setting
                elif key in VALUED and value:
                    name, parse = VALUED[key]
                    fields[name] = parse(key, value)
                elif key in KERNEL_OPTIONS and not has_value:
                    kernel.add(key)
                elif key in FLAGS or key in KERNEL_OPTIONS:
                    raise CowfsError(f"mount option {key!r} takes no value (given {opt!r})")
                elif key in VALUED:
                    raise CowfsError(f"mount option {key!r} needs a value: {key}=...")
                else:
                    raise CowfsError(f"unknown mount option {opt!r} (see 'cowfs mount --help')")
        return cls(kernel=frozenset(kernel), **fields)

    def fuse_options(self, source: str) -> set[str]:
        opts = set(pyfuse3.default_options) | {f"fsname={source}", "subtype=cowfs"} | self.kernel
        if self.allow_other:
            opts.add("allow_other")
        if self.debug:
            opts.add("debug")
        if self.noatime:
            opts.add("noatime")
        return opts

    def describe(self) -> str:
        """The flags a user may want to know about, e.g. ``nosuid,nodev,relatime``."""
        flags: list[str] = [f for f in ("ro", "noexec") if f in self.kernel]
        flags += ["suid" if "suid" in self.kernel else "nosuid",
                  "dev" if "dev" in self.kernel else "nodev", self.atime]
        return ",".join([*flags, *(["nodiratime"] if self.nodiratime else [])])


def _parse_timeout(_key: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise CowfsError(f"invalid timeout {value!r}: give a number of seconds, e.g. timeout=1")
    return seconds


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _parse_size(key: str, value: str) -> int:
    """``SIZE`` in bytes, or with a binary suffix (``64M``, ``1G``)."""
    number, unit = value[:-1], value[-1:].lower()
    if unit.isdigit():
        number, unit = value, ""
    if number.isdigit() and unit in _SIZE_UNITS:
        return int(number) * _SIZE_UNITS[unit]
    raise CowfsError(f"invalid {key} size {value!r}: give bytes or a size such as 64M or 1G")


#: The options that take no value: each sets one field of :class:`MountOptions`.
FLAGS: dict[str, tuple[str, object]] = {
    "allow_other": ("allow_other", True),
    "debug": ("debug", True),
    "volatile": ("volatile", True),
    "relocate": ("relocate", True),
    "writeback": ("writeback", True), "nowriteback": ("writeback", False),
    "metacopy": ("metacopy", True), "nometacopy": ("metacopy", False),
    "nopartial_copyup": ("partial_min", 0),
    "atime": ("atime", "relatime"), "relatime": ("atime", "relatime"),
    "noatime": ("atime", "noatime"), "strictatime": ("atime", "strictatime"),
    "nodiratime": ("nodiratime", True), "diratime": ("nodiratime", False),
}
#: The options that take a value (``key=value``): the field each sets, and its parser.
VALUED: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "partial_copyup": ("partial_min", _parse_size),
    "timeout": ("timeout", _parse_timeout),
}


def set_mount_flags(mountpoint: Path, options: MountOptions) -> None:
    """Set the access-time flags libfuse cannot pass (``strictatime``, ``nodiratime``) on the
    mount, as ``mount -o remount,bind`` would, with mount_setattr(2) (root only)."""
    if not options.set_after_mount:
        return
    attr_set = MOUNT_ATTR_STRICTATIME if options.atime == "strictatime" else 0
    attr_clr = MOUNT_ATTR_ATIME_MASK if options.atime == "strictatime" else 0
    if options.nodiratime:
        attr_set |= MOUNT_ATTR_NODIRATIME
    attr = struct.pack("QQQQ", attr_set, attr_clr, 0, 0)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, os.fsencode(mountpoint), 0,
                    ctypes.c_char_p(attr), len(attr)) != 0:
        err = ctypes.get_errno()
        raise CowfsError(f"cannot set {options.describe()} on {str(mountpoint)!r}: "
                         f"{os.strerror(err)}")


#: mount(2) flags (linux/mount.h), and the statvfs flags that show each on a mount.
MS_REMOUNT = 0x20
_MOUNT_FLAGS = {  # option: (mount(2) flag, statvfs f_flag bit)
    "ro": (0x1, os.ST_RDONLY),
    "nosuid": (0x2, os.ST_NOSUID),
    "nodev": (0x4, os.ST_NODEV),
    "noexec": (0x8, os.ST_NOEXEC),
    "sync": (0x10, os.ST_SYNCHRONOUS),
    "noatime": (0x400, os.ST_NOATIME),
    "nodiratime": (0x800, os.ST_NODIRATIME),
    "relatime": (0x200000, os.ST_RELATIME),
    "strictatime": (0x1000000, 0),
}
#: What mount(8) repeats of the mount table on a remount (the FUSE connection's options), and
#: the layers of an fstab line: none of these change on a remount.
_REPEATED_ON_REMOUNT = frozenset({"user_id", "group_id", "default_permissions", "allow_other",
                                  "max_read", "blksize", "rootmode", "fd", "lowerdir", "upperdir",
                                  "workdir", "remount"})
#: Options that clear one of those flags again.
_CLEARING = {"rw": "ro", "suid": "nosuid", "dev": "nodev", "exec": "noexec", "async": "sync",
             "diratime": "nodiratime"}


def remount(mountpoint: Path, specs: list[str]) -> None:
    """``mount -o remount,...``: change the flags of a mounted cowfs (read-only, nosuid, the
    access-time policy, ...) with mount(2) ``MS_REMOUNT``, which the kernel applies to a FUSE
    mount by itself. The flags not named stay as they are (a remount replaces them all). Options
    of cowfs itself (layers, caching) stay as mounted: mount(8) repeats them on a remount."""
    changes = []
    for spec in specs:
        for opt in filter(None, spec.split(",")):
            key = opt.partition("=")[0]
            if key in ATIME_OPTIONS or key in _MOUNT_FLAGS or key in _CLEARING:
                changes.append(key)
            elif key not in _REPEATED_ON_REMOUNT:
                MountOptions.parse([opt])  # refuses an unknown option with a clear message
                log.info("remount: %s stays as mounted (only ro/rw, nosuid, nodev, noexec, sync "
                         "and the access-time options change)", opt)
    if not os.path.ismount(mountpoint):
        raise CowfsError(f"{str(mountpoint)!r} is not a mount point")
    current = os.statvfs(mountpoint).f_flag
    wanted = {name for name, (_, bit) in _MOUNT_FLAGS.items() if bit and current & bit}
    for key in changes:
        if key in ATIME_OPTIONS:
            wanted -= ATIME_OPTIONS
            if key != "atime":
                wanted.add(key)
        elif key in _MOUNT_FLAGS:
            wanted.add(key)
        else:
            wanted.discard(_CLEARING[key])
    flags = MS_REMOUNT
    for name in wanted:
        flags |= _MOUNT_FLAGS[name][0]
    if libc.mount(None, os.fsencode(mountpoint), None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise CowfsError(f"cannot remount {str(mountpoint)!r}: {os.strerror(err)}")


def apply_mount_flags(mountpoint: Path, overlay: Overlay) -> None:
    """Tell ``overlay`` the read-only flag and access-time policy its mount has now."""
    found = [m for m in mounts.fuse_mounts_at(mountpoint) if m.fstype == "fuse.cowfs"]
    if not found:
        return  # unmounted meanwhile
    flags = set(found[-1].options.split(","))
    overlay.mounted_read_only = "ro" in flags
    overlay.noatime = "noatime" in flags
    overlay.strictatime = not flags & {"noatime", "relatime"}


def follow_mount_flags(mountpoint: Path, overlay: Overlay) -> None:
    """Keep the overlay's idea of its mount's flags true across remounts (``mount -o remount,ro``,
    ``remount,strictatime``): the kernel applies them to a FUSE mount without telling the
    daemon, but the mount table signals every change (``POLLPRI`` on /proc/self/mountinfo), and a
    thread waits for that. What the daemon needs them for: a read-only or noatime mount leaves
    the upper's access times alone, a strictatime one sets them on every read."""
    apply_mount_flags(mountpoint, overlay)
    table = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
    poller = select.poll()
    poller.register(table, select.POLLPRI)

    def follow() -> None:
        while True:
            os.lseek(table, 0, os.SEEK_SET)
            while os.read(table, 1 << 16):  # reading it all acknowledges the change
                pass
            poller.poll()
            try:
                apply_mount_flags(mountpoint, overlay)
            except (OSError, ValueError) as e:
                log.warning("cannot read the mount's flags: %s", e)

    threading.Thread(target=follow, name="mount-flags", daemon=True).start()


def check_privileges(options: MountOptions) -> None:
    if options.set_after_mount and os.geteuid() != 0:
        raise CowfsError("-o strictatime and -o nodiratime need root: the kernel takes them only "
                         "after mounting (mount_setattr), which a plain user may not call; "
                         "leave them out (relatime is the default)")


# --- mountpoint checks and state files ---------------------------------------------------------


def raise_readahead(mountpoint: Path, kib: int = READAHEAD_KIB) -> None:
    """Set the readahead of our mount (its bdi); only root may, so failing is not an error.

    Called after the kernel has processed INIT, which would otherwise lower it again.
    """
    try:
        found = mounts.fuse_mounts_at(mountpoint)
        if found:
            Path(f"/sys/class/bdi/{found[-1].device}/read_ahead_kb").write_text(f"{kib}\n")
    except OSError as e:
        log.debug("readahead of %s left as it is: %s", mountpoint, e)


def check_mountpoint(path: Path) -> Path:
    mounts.refuse_root_mountpoint(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise CowfsError(f"mountpoint {str(path)!r}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CowfsError(f"mountpoint {str(path)!r} is not a directory")
    real = path.resolve()
    found = mounts.fuse_mount_at(real)
    if found is not None:
        raise CowfsError(f"mountpoint {str(path)!r} is already mounted ({found}); "
                         f"unmount it first with 'cowfs umount {path}'")
    return real


@contextlib.contextmanager
def _state_recorded(mountpoint: Path, paths: LayerPaths, stack: LayerStack) -> Iterator[None]:
    state = MountState(os.getpid(), str(mountpoint), tuple(str(p) for p in paths.lowers),
                       str(paths.upper), str(stack.work.path))
    path = mounts.write_state(state)
    try:
        yield
    except BaseException as e:
        mounts.write_state(dataclasses.replace(state, error=f"{type(e).__name__}: {e}"))
        raise
    path.unlink()


# --- serving -----------------------------------------------------------------------------------


def _raise_fd_limit() -> None:
    """Every open file holds a descriptor (or two), and the cache of real objects grows with the
    limit (:func:`cowfs.daemon.vfs.descriptor_budget`): allow as many as we may."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or os.geteuid() == 0:
        with contextlib.suppress(OSError, ValueError):
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            resource.setrlimit(resource.RLIMIT_NOFILE, (nr_open, nr_open))
            return
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def inline_loop() -> bool:
    """Whether to run pyfuse3's inline request loop (patches/pyfuse3/0003): handlers that do not
    wait run without a pass through trio's scheduler and epoll, about half the daemon's CPU per
    request (docs/performance.md). A stock pyfuse3 lacks it; ``COWFS_LOOP=stock`` (or
    ``COWFS_STOCK_PYFUSE3=1``) runs pyfuse3's own loop even where it is there: an escape hatch,
    and the A side of the benchmark's A/B."""
    if os.environ.get("COWFS_STOCK_PYFUSE3") == "1" or os.environ.get("COWFS_LOOP") == "stock":
        return False
    return hasattr(pyfuse3, "request_count")


#: How many times the inline loop checks for the next request without sleeping before it waits
#: in poll(2) (``idle_spins``, patches/pyfuse3/0006), yielding the CPU in between: on virtual
#: CPUs a thread that sleeps between a reply and the client's next request is woken late
#: (docs/performance.md, "Where the client and the daemon run").
IDLE_SPINS = 100


def loop_arguments() -> dict[str, bool | int]:
    """``pyfuse3.main``'s arguments for the inline loop. Where pyfuse3 has ``idle_poll``
    (patches/pyfuse3/0006), the loop waits for the next request in poll(2) instead of a pass
    through trio when nothing else can run (a client waiting on each reply: a walk, a
    ``stat`` of many names), first checking :data:`IDLE_SPINS` times without sleeping.
    ``COWFS_LOOP=inline-epoll`` leaves both off, ``COWFS_LOOP=nospin`` the checks (the A sides
    of their A/B runs)."""
    arguments: dict[str, bool | int] = {"inline": True}
    parameters = _main_parameters()
    loop = os.environ.get("COWFS_LOOP")
    if "idle_poll" in parameters:
        arguments["idle_poll"] = loop != "inline-epoll"
    if "idle_spins" in parameters:
        arguments["idle_spins"] = 0 if loop in ("inline-epoll", "nospin") else IDLE_SPINS
    return arguments


def _main_parameters() -> frozenset[str]:
    """The keyword arguments ``pyfuse3.main`` takes (none known when it has no signature)."""
    try:
        return frozenset(inspect.signature(pyfuse3.main).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _write_loop_stats(path: str) -> None:
    # getattr: a stock pyfuse3's type stubs do not have it (lint runs against either).
    request_count: Callable[[], tuple[int, ...]] = getattr(pyfuse3, "request_count")  # noqa: B009
    counts = request_count()
    line = f"requests {counts[0]} suspended {counts[1]}"
    if len(counts) > 2:  # patches/pyfuse3/0006
        line += f" idle_waits {counts[2]}"
    Path(path + ".tmp").write_text(line + "\n")
    os.replace(path + ".tmp", path)


async def _loop_stats_on_signal(path: str) -> None:
    """Benchmarks and tests (``COWFS_LOOP_STATS=FILE``): on SIGUSR2, write the number of
    requests the loop has read and of handlers that suspended to FILE, as
    ``requests N suspended M``."""
    with trio.open_signal_receiver(signal.SIGUSR2) as signals:
        async for _ in signals:
            _write_loop_stats(path)


async def _serve_until_unmounted() -> bool:
    """Run the FUSE loop; return True when it ended by a signal (we must unmount ourselves)."""
    signalled = False
    inline = inline_loop()
    log.debug("request loop: %s", "inline" if inline else "pyfuse3's own")
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
        stats = os.environ.get("COWFS_LOOP_STATS")
        if stats and hasattr(pyfuse3, "request_count"):
            nursery.start_soon(_loop_stats_on_signal, stats)
        # Typed loosely: a stock pyfuse3's type stubs do not know ``inline``.
        main: Callable[..., Awaitable[None]] = pyfuse3.main
        await (main(**loop_arguments()) if inline else main())
        nursery.cancel_scope.cancel()
    return signalled


def serve(paths: LayerPaths, stack: LayerStack, mountpoint: Path, options: MountOptions,
          ready: Callable[[], None]) -> None:
    """Mount ``stack`` at ``mountpoint`` and serve until unmounted. Calls ``ready`` once mounted."""
    os.umask(0)  # modes of new objects are exactly what the caller asked for
    _raise_fd_limit()
    collect_less()
    with contextlib.ExitStack() as cleanup:
        overlay = Overlay(stack, sync=not options.volatile, noatime=options.noatime,
                          metacopy=options.metacopy, partial_min=options.partial_min,
                          relocate=options.relocate)
        cleanup.callback(overlay.close)
        operations = Operations(overlay, timeout=options.timeout, writeback=options.writeback,
                                after_init=lambda: raise_readahead(mountpoint))
        fusecheck.init(operations, str(mountpoint), options.fuse_options("cowfs"))
        unmount = True
        cleanup.callback(lambda: pyfuse3.close(unmount=unmount))
        set_mount_flags(mountpoint, options)
        follow_mount_flags(mountpoint, overlay)
        cleanup.enter_context(_state_recorded(mountpoint, paths, stack))
        log.info("mounted %s (upper %s, lowers %s)", mountpoint, paths.upper,
                 ":".join(map(str, paths.lowers)))
        realfs.arm_faults_from_env()  # tests only: what mounting changed is not counted
        ready()
        unmount = trio.run(_serve_until_unmounted)
    log.info("unmounted %s", mountpoint)


def prepare(paths: LayerPaths, mountpoint: Path,
            options: MountOptions | None = None) -> tuple[LayerPaths, LayerStack, Path]:
    """Everything that can fail because of user input, done before forking into the background.

    Returns the layer paths resolved (nothing may resolve a path once mounted: the mountpoint may
    be a layer's own path), the opened stack, and the resolved mountpoint.
    """
    options = options or MountOptions()
    check_privileges(options)
    real_mountpoint = check_mountpoint(mountpoint)
    resolved = paths.resolved()
    check_mountpoint_outside(resolved, real_mountpoint)
    stack = open_stack(resolved, read_only=options.read_only, relocate=options.relocate)
    return resolved, stack, real_mountpoint
