"""Private views for ``cowfs run``: the view is mounted where only the job sees it.

``cowfs run`` forks; the child leaves the machine's mount namespace (``unshare(CLONE_NEWNS)``),
makes every mount of its copy private (so that nothing it mounts propagates back), mounts a tmpfs
over cowfs's state directory (its daemon's state file is its own: several runs over one base do
not share one), then mounts the view, runs the job in it and unmounts it. The parent waits,
passing SIGTERM and SIGHUP on (Ctrl-C reaches the job through the terminal), and reports. Other
processes never see the view, and several runs over one base at once do not meet. This is what
binpash's ``try`` does with ``unshare --mount``.

An error in the child (the mount failed, the command does not exist) comes back to the parent
through a pipe and is raised there as the same :class:`~cowfs.errors.CowfsError`, so that the
caller cleans up and reports as it would for an error of its own.

Known limits: a mount namespace needs ``CAP_SYS_ADMIN``, so this is for root; a plain user would
need a user namespace, where the daemon would be uid 0 without the right to give copied-up files
the owners of files it does not own (unmapped ids), so plain users get the shared view, and
``cowfs run`` says so in one line. A child killed with SIGKILL leaves its daemon serving a
namespace nobody can enter; ``cowfs run`` itself never does that.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import mounts
from ..errors import CowfsError

CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 2


def available() -> bool:
    """Whether this process may make a private mount namespace (root)."""
    return os.geteuid() == 0


def _enter() -> None:
    """Leave the machine's mount namespace for a private copy of it, with a state directory of
    its own."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        err = ctypes.get_errno()
        raise CowfsError(f"cannot make a private mount namespace: {os.strerror(err)}")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        err = ctypes.get_errno()
        raise CowfsError(f"cannot make the mounts private: {os.strerror(err)}")
    state = mounts.state_dir()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    if libc.mount(b"cowfs-state", os.fsencode(state), b"tmpfs", 0, b"mode=0700") != 0:
        err = ctypes.get_errno()
        raise CowfsError(f"cannot give the private view a state directory: {os.strerror(err)}")


@contextlib.contextmanager
def signals_to(pid: int) -> Iterator[None]:
    """SIGINT ignored (the terminal sends it to the job too, as to a shell's foreground job),
    SIGTERM and SIGHUP passed on to ``pid``."""
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGHUP: signal.signal(signal.SIGHUP, forward)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _detach_left(mountpoint: Path) -> None:
    """A view the child could not unmount (busy, fusermount3 failing) is detached: nobody else
    can see it, and a daemon left serving a namespace that nobody can enter would never end (it
    ends when its mount goes)."""
    target = os.path.abspath(mountpoint)
    if target not in mounts.cowfs_mountpoints():
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        print(f"cowfs: warning: cannot detach the private view at {target!r}: "
              f"{os.strerror(err)}", file=sys.stderr)


def run(body: Callable[[], int], mountpoint: Path) -> int:
    """``body()`` in a forked child inside a private mount namespace; returns its result (an exit
    status). A :class:`CowfsError` in the child is raised here. A view still mounted at
    ``mountpoint`` when ``body`` ends is detached."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        status = 70  # EX_SOFTWARE: a bug (its traceback printed)
        report = b""
        try:
            _enter()
            try:
                status = body()
            finally:
                _detach_left(mountpoint)
        except CowfsError as e:
            report = f"{e.exit_code}\n{e}".encode()
            status = e.exit_code
        except KeyboardInterrupt:
            report = b"130\ninterrupted (Ctrl-C)"
            status = 130
        except BaseException:
            traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                os.write(write_end, report)
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    os.close(write_end)
    with signals_to(pid):
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
        _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    if report:
        code, _, message = report.decode(errors="replace").partition("\n")
        raise CowfsError(message, int(code))
    if status < 0:  # the child itself was killed
        raise CowfsError(f"the private view's process was ended by "
                         f"{signal.Signals(-status).name}", 128 - status)
    return status
