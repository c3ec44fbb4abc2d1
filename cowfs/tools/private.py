"""Private views for ``cowfs run``: the view is mounted where only the job sees it.

``cowfs run`` forks; the child leaves the machine's mount namespace (``unshare(CLONE_NEWNS)``),
makes every mount of its copy a slave (nothing it mounts propagates back, while unmounts made
outside reach it wherever the machine's mounts are shared, as systemd makes them), mounts a tmpfs
over cowfs's state directory (its daemon's state file is its own: several runs over one base do
not share one), then mounts the view, runs the job in it and unmounts it. The parent waits,
passing SIGTERM and SIGHUP on (Ctrl-C reaches the job through the terminal), and reports. Other
processes never see the view, and several runs over one base at once do not meet. This is what
binpash's ``try`` does with ``unshare --mount``.

An error in the child (the mount failed, the command does not exist) comes back to the parent
through a pipe and is raised there as the same :class:`~cowfs.core.errors.CowfsError`, so that the
caller cleans up and reports as it would for an error of its own.

A plain user's child first enters a user namespace of its own (``unshare(CLONE_NEWUSER)``, as
``unshare --user --map-user=$(id -u)`` does), where its own user and group map to themselves and
nothing else is mapped: it owns the namespace, so it may mount there (FUSE allows it; the
kernel makes such mounts nosuid and nodev), and it passes CAP_SYS_ADMIN on to the daemon it starts
(an ambient capability, since neither is uid 0 there). The job runs without it, as the user it
is. In there, objects of other users show the overflow owner (``nobody``, 65534), as in any
rootless container, and the daemon, which is the user, copies up as a plain user's daemon does.

Known limits: a kernel or an administrator can forbid unprivileged user namespaces (Debian's
``kernel.unprivileged_userns_clone=0``, ``user.max_user_namespaces=0``); plain users then get the
shared view, and ``cowfs run`` says so in one line. A child killed with SIGKILL leaves its daemon
serving a namespace nobody can enter; ``cowfs run`` itself never does that. The namespace holds
a copy of every mount that existed when the job started: where the machine's mounts are private
rather than shared (some containers), a filesystem unmounted outside meanwhile lives on in it
until the job ends (a FUSE daemon unmounted meanwhile serves on, and ``cowfs umount`` of it waits
for its daemon; the kernel's overlayfs with ``index=on`` refuses its upper to a new mount).
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

from ..core import mounts
from ..core.errors import CowfsError
from ..core.libc import libc

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_SLAVE = 0x80000
MNT_DETACH = 2
CAP_SYS_ADMIN = 21
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _fail(what: str) -> CowfsError:
    return CowfsError(f"{what}: {os.strerror(ctypes.get_errno())}")


def available() -> bool:
    """Whether this process may make a private mount namespace: root, or a plain user where the
    kernel lets plain users make user namespaces (tried in a short-lived child)."""
    if os.geteuid() == 0:
        return True
    pid = os.fork()
    if pid == 0:
        os._exit(0 if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _own_user_namespace() -> None:
    """A user namespace where this user and group map to themselves, and CAP_SYS_ADMIN in it
    passed on to the programs this process starts (the daemon; see :func:`without_ambient`)."""
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
        raise _fail("cannot make a private user namespace")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w", encoding="ascii") as f:
            f.write(text)
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise _fail("cannot read this process's capabilities")
    data[0].inheritable |= 1 << CAP_SYS_ADMIN
    if libc.capset(ctypes.byref(header), data) != 0:
        raise _fail("cannot keep CAP_SYS_ADMIN for the daemon")
    _raise_ambient()


def _raise_ambient() -> None:
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_SYS_ADMIN, 0, 0) != 0:
        raise _fail("cannot pass CAP_SYS_ADMIN on to the daemon")


@contextlib.contextmanager
def without_ambient() -> Iterator[None]:
    """Programs started inside run without the capability the daemon was given (the job runs
    as the user it is); nothing to do where no user namespace was made (root)."""
    if os.geteuid() == 0:
        yield
        return
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise _fail("cannot drop CAP_SYS_ADMIN for the job")
    try:
        yield
    finally:
        _raise_ambient()  # unmounting starts fusermount3, which needs it


def _enter() -> None:
    """Leave the machine's mount namespace for a private copy of it, with a state directory of
    its own (as a plain user, inside a user namespace of its own first)."""
    if os.geteuid() != 0:
        _own_user_namespace()
    elif libc.unshare(CLONE_NEWNS) != 0:
        raise _fail("cannot make a private mount namespace")
    if libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
        raise _fail("cannot make the mounts private")
    state = mounts.state_dir()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    if libc.mount(b"cowfs-state", os.fsencode(state), b"tmpfs", 0, b"mode=0700") != 0:
        raise _fail("cannot give the private view a state directory")


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
