"""The mount lifecycle seen from outside the daemon: start it and wait until it serves (with a
timeout), unmount and wait for the daemon to exit, retry while the mount is busy, and detach it
lazily as the last resort.

One home for what the command line (``cowfs mount``/``umount``), the Python API and ``cowfs run``
all do, below the three of them: it imports only :mod:`cowfs.core.mounts` (the mount table and the
state files) and :mod:`cowfs.core.errors`, never pyfuse3 or trio; what the daemon runs is passed in.

Known limits: a lazily detached mount stays served until the last process using it leaves; its
daemon is not waited for (nothing could say how long that takes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import mounts
from .errors import CowfsError

log = logging.getLogger(__name__)

#: How long a starting daemon may take to report that it serves (opening the layers and the
#: recovery of the work directory happen before; both are quick unless the layers are huge).
MOUNT_TIMEOUT = 120.0
#: How long to wait for a daemon to exit after its mount is gone.
EXIT_TIMEOUT = 30.0
#: How long a busy mount is retried (a process that just left may still hold it for a moment).
BUSY_TIMEOUT = 5.0
BUSY_RETRY = 0.1


# --- starting ------------------------------------------------------------------------------------


def daemon_command() -> list[str]:
    """How to start this very cowfs in a subprocess, whatever the caller's working directory:
    ``-P`` keeps ``python -m`` from putting the working directory first on ``sys.path`` (where a
    folder named ``cowfs`` would be imported instead); :func:`daemon_environment` says where this
    cowfs is."""
    return [sys.executable, "-P", "-m", "cowfs"]


def daemon_environment() -> dict[str, str]:
    """The environment with this cowfs package's directory first on ``PYTHONPATH``."""
    here = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    return env


def mount_in_subprocess(lowers: Sequence[Path], upper: Path, mountpoint: Path,
                        options: Sequence[str] = (), timeout: float = MOUNT_TIMEOUT) -> None:
    """``cowfs mount`` in a subprocess; returns once the filesystem serves requests."""
    cmd = [*daemon_command(), "mount", *(["-o", ",".join(options)] if options else []),
           ":".join(os.path.abspath(p) for p in lowers), os.path.abspath(upper),
           os.path.abspath(mountpoint)]
    try:
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                check=False, env=daemon_environment(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CowfsError(f"cowfs mount of {str(mountpoint)!r} did not finish within "
                         f"{timeout:g} s") from None
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        raise CowfsError(message.removeprefix("cowfs: error: ") or
                         f"cowfs mount failed with status {result.returncode}")


def daemonize(run: Callable[[Callable[[], None]], None], setup: Callable[[], None],
              timeout: float = MOUNT_TIMEOUT) -> None:
    """Run ``run(ready)`` in a detached child; return in the parent once the child has called
    ``ready()``. A child that fails first reports its error (raised here as a
    :class:`CowfsError`); one that reports nothing within ``timeout`` seconds is ended."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        try:
            message = _read_report(read_end, pid, timeout)
        finally:
            os.close(read_end)
        if message != "ok":
            raise CowfsError(message or "the cowfs daemon exited before mounting")
        return
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    setup()
    status = 0

    def ready() -> None:
        os.write(write_end, b"ok")
        os.close(write_end)

    try:
        run(ready)
    except CowfsError as e:
        _report(write_end, str(e))
        status = e.exit_code
    except BaseException as e:
        log.exception("cowfs daemon failed")
        _report(write_end, f"the cowfs daemon failed: {e}")
        status = 1
    os._exit(status)


def _read_report(fd: int, pid: int, timeout: float) -> str:
    """What the child wrote before closing its end of the pipe, or an error after ``timeout``."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            raise CowfsError(f"the cowfs daemon (pid {pid}) did not start serving within "
                             f"{timeout:g} s; it was stopped (see its --log)")
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk


def _report(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):  # already closed once the mount was reported ready
        os.write(fd, message.encode())
        os.close(fd)


# --- stopping ------------------------------------------------------------------------------------


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def unmount(mountpoint: str, timeout: float = EXIT_TIMEOUT) -> str | None:
    """Unmount the cowfs mount at ``mountpoint`` and wait until its daemon has exited. Returns a
    note for the user when there was no daemon to wait for: it had died (``kill -9``, a crash)
    and left a dead mount ("Transport endpoint is not connected"), which is removed."""
    path = Path(mountpoint).resolve()
    if mounts.fuse_mount_at(path) != "fuse.cowfs":
        raise CowfsError(f"{mountpoint!r} is not a cowfs mountpoint")
    state = mounts.load_state(path)
    died = state is not None and state.error is None and not mounts.process_exists(state.pid)
    tool = _fusermount()
    cmd = [tool, "-u", str(path)] if tool else ["umount", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        alive = f" (pid {state.pid})" if state is not None and mounts.process_exists(
            state.pid) else ""
        raise CowfsError(f"cannot unmount {mountpoint!r}: {reason}; it is still mounted and "
                         f"its daemon{alive} still serves it")
    if state is None:
        log.warning("no state file for %s: unmounted without waiting for the daemon", path)
        return None
    if died:
        with contextlib.suppress(OSError):
            mounts.state_file(path).unlink()
        return (f"the cowfs daemon of {str(path)!r} (pid {state.pid}) had died; its dead mount "
                "was removed (changes it acknowledged are in the upper)")
    _wait_for_exit(state.pid, timeout)
    after = mounts.load_state(path)
    if after is not None and after.pid == state.pid:
        raise CowfsError(f"unmounted, but the cowfs daemon (pid {state.pid}) ended with an error: "
                         f"{after.error or 'it did not clean up'}")
    return None


def _wait_for_exit(pid: int, timeout: float) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CowfsError(f"unmounted, but the cowfs daemon (pid {pid}) has not exited "
                                 f"after {timeout:g} s")
            if select.select([pidfd], [], [], remaining)[0]:
                return
    finally:
        os.close(pidfd)


def unmount_when_idle(mountpoint: Path, busy_timeout: float = BUSY_TIMEOUT) -> None:
    """:func:`unmount`, retrying while the mount is busy; after ``busy_timeout`` seconds it is
    detached lazily (it disappears from the namespace at once and is served until the last
    process using it leaves), with a warning, so that a view never outlives its owner."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            note = unmount(str(mountpoint))
            if note is not None:
                log.warning("%s", note)
            return
        except CowfsError as e:
            if "busy" not in str(e):
                raise
            if time.monotonic() >= deadline:
                break
            time.sleep(BUSY_RETRY)
    detach(mountpoint)
    log.warning("%s was still in use after %g s (a process has a file or its working directory "
                "in it); detached lazily: its daemon exits when the last such process does",
                mountpoint, busy_timeout)


def detach(mountpoint: Path) -> None:
    """Lazy unmount (``fusermount3 -uz``, ``umount -l``)."""
    tool = _fusermount()
    cmd = [tool, "-uz", str(mountpoint)] if tool else ["umount", "-l", str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False,
                            timeout=EXIT_TIMEOUT)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise CowfsError(f"cannot detach {str(mountpoint)!r}: {reason}")
