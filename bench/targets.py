"""The targets: how each one is mounted fresh over the fixture with an empty upper, and unmounted.

Every FUSE daemon runs in the foreground as our child, so its pid is known (CPU time, memory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common import MOUNT_TIMEOUT, log, run
from fixture import Fixture

# --- mounts -------------------------------------------------------------------------------------


def mounts_under(prefix: Path) -> list[str]:
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = os.fsdecode(line.split()[4]).replace("\\040", " ")
            if point == str(prefix) or point.startswith(str(prefix) + "/"):
                found.append(point)
    return found


def is_mounted(path: Path) -> bool:
    return str(path) in mounts_under(path)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def fuse_abort(mnt: Path) -> None:
    """Abort a FUSE connection so that processes blocked on it get errors instead of hanging."""
    with contextlib.suppress(OSError):
        minor = os.minor(os.stat(mnt).st_dev)  # may itself hang; only used once all else failed
        Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


@dataclass
class Mounted:
    view: Path
    pid: int | None = None  # the FUSE daemon, when there is one
    proc: subprocess.Popen[bytes] | None = None
    fuse: bool = False


class Target:
    name = ""
    fuse = False

    def available(self) -> str | None:
        """None when usable, else why not."""
        return None

    def mount(self, fx: Fixture, session: Path) -> Mounted:
        raise NotImplementedError

    def unmount(self, m: Mounted) -> None:
        if not is_mounted(m.view):
            return
        try:
            run(["umount", str(m.view)], timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            log(f"{self.name}: umount failed; aborting the connection and unmounting lazily")
            if m.fuse:
                fuse_abort(m.view)
            subprocess.run(["umount", "-l", str(m.view)], timeout=60, check=False)

    def wait_daemon(self, m: Mounted) -> None:
        if m.proc is None:
            return
        try:
            m.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"{self.name}: daemon {m.proc.pid} did not exit; killing it")
            m.proc.kill()
            m.proc.wait(timeout=30)


class Native(Target):
    """The lower tree itself, copied per session where workloads write (untimed)."""

    name = "native"

    def mount(self, fx: Fixture, session: Path) -> Mounted:
        view = session / "native"
        view.mkdir()
        run(["cp", "-a", str(fx.lower / "src"), str(view / "src")], timeout=600)
        run(["cp", "-al", str(fx.lower / "bigdir"), str(view / "bigdir")], timeout=600)
        os.link(fx.native_big, view / "big")
        return Mounted(view)

    def unmount(self, m: Mounted) -> None:
        pass


class KernelOverlay(Target):
    name = "overlayfs"

    def available(self) -> str | None:
        with open("/proc/filesystems") as f:
            return None if "overlay" in f.read() else "no overlay filesystem in this kernel"

    def mount(self, fx: Fixture, session: Path) -> Mounted:
        upper, work, mnt = (session / n for n in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            d.mkdir()
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={fx.lower},upperdir={upper},workdir={work}", str(mnt)], timeout=60)
        return Mounted(mnt)


class FuseTarget(Target):
    fuse = True
    program = ""
    #: The daemon's descriptor limit (soft and hard), None for the benchmark's own; as root the
    #: daemon also runs without CAP_SYS_RESOURCE, so that it cannot raise it (bench/scale.py).
    fd_limit: int | None = None

    def available(self) -> str | None:
        return None if shutil.which(self.program) else f"{self.program} is not installed"

    def command(self, fx: Fixture, upper: Path, work: Path, mnt: Path) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """The daemon's environment (None: the benchmark's own)."""
        return None

    def mount(self, fx: Fixture, session: Path) -> Mounted:
        upper, work, mnt = (session / n for n in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            d.mkdir()
        cmd = self.command(fx, upper, work, mnt)
        if self.fd_limit is not None:
            # Both exec the command: the daemon keeps the pid the benchmark knows.
            drop = (["setpriv", "--bounding-set", "-sys_resource", "--"] if os.geteuid() == 0
                    else [])
            cmd = [*drop, "prlimit", f"--nofile={self.fd_limit}:{self.fd_limit}", "--", *cmd]
        log_file = open(session / f"{self.name}.log", "wb")  # noqa: SIM115 (outlives this call)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                env=self.environment())
        log_file.close()
        m = Mounted(mnt, proc.pid, proc, fuse=True)
        try:
            wait_for(lambda: is_mounted(mnt) or proc.poll() is not None, MOUNT_TIMEOUT,
                     f"{self.name} to mount")
            if not is_mounted(mnt):
                raise RuntimeError(f"{self.name} exited with {proc.returncode}: "
                                   + (session / f"{self.name}.log").read_text()[-2000:])
        except BaseException:
            self.unmount(m)
            self.wait_daemon(m)
            raise
        return m

    def unmount(self, m: Mounted) -> None:
        super().unmount(m)
        self.wait_daemon(m)


class FuseOverlayfs(FuseTarget):
    name = "fuse-overlayfs"
    program = "fuse-overlayfs"

    def command(self, fx: Fixture, upper: Path, work: Path, mnt: Path) -> list[str]:
        return [self.program, "-f", "-o", f"lowerdir={fx.lower},upperdir={upper},workdir={work}",
                str(mnt)]


class Unionfs(FuseTarget):
    name = "unionfs-fuse"
    program = "unionfs"

    def command(self, fx: Fixture, upper: Path, work: Path, mnt: Path) -> list[str]:
        return [self.program, "-f", "-o", "cow", f"{upper}=RW:{fx.lower}=RO", str(mnt)]


class Cowfs(FuseTarget):
    """cowfs; ``loop="stock"`` (target ``cowfs-stock``) runs pyfuse3's own request loop
    (COWFS_LOOP=stock), the A side of an A/B of patches/pyfuse3/0003; ``loop="inline-epoll"``
    the inline loop waiting for requests in trio's epoll alone, the A side of one of 0006
    (:func:`cowfs.daemon.mount.loop_arguments`). ``source``: a directory
    holding another version's ``cowfs`` package, which the daemon imports instead (target
    ``cowfs-NAME``, from ``--cowfs-source NAME=DIR``: an A/B of two commits)."""

    def __init__(self, program: str, options: str, loop: str = "", *,
                 source: tuple[str, str] | None = None) -> None:
        self.program = program
        self.options = options
        self.loop = loop
        self.source = source
        self.name = (f"cowfs-{loop}" if loop else f"cowfs-{source[0]}" if source
                     else "cowfs")

    def environment(self) -> dict[str, str] | None:
        env = {**os.environ, "COWFS_LOOP": self.loop} if self.loop else None
        if self.source is not None:
            env = {**(env or os.environ), "PYTHONPATH": self.source[1]}
        return env

    def command(self, fx: Fixture, upper: Path, work: Path, mnt: Path) -> list[str]:
        opts = ["-o", self.options] if self.options else []
        return [self.program, "mount", "-f", *opts, str(fx.lower), str(upper), str(mnt)]

    def unmount(self, m: Mounted) -> None:
        if is_mounted(m.view):
            try:  # the documented way; it also waits for the daemon to finish
                run([self.program, "umount", str(m.view)], timeout=90)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log(f"cowfs umount failed ({e}); falling back to umount")
        super().unmount(m)
