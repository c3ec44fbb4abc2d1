"""Why a FUSE mount cannot work, said in one line with what to do about it.

libfuse reports a failed mount as ``RuntimeError: fuse_session_mount failed``; the reason is printed
by libfuse or by ``fusermount3`` (which mounts for plain users) on stderr, which a background
daemon does not have. So :func:`preflight` checks the usual causes up front, before the daemon
forks: no ``/dev/fuse`` or no access to it (these machines ship it 0600), ``fusermount3`` missing
or not set-user-ID, ``allow_other`` without ``user_allow_other`` in /etc/fuse.conf, a mountpoint the
user may not write to; and in a container, the flags it was started without (``--device
/dev/fuse``, ``--cap-add SYS_ADMIN``: no device, or no way to gain CAP_SYS_ADMIN, which mounting
needs). And :func:`init` runs ``pyfuse3.init`` with stderr captured, so that what
nothing foresaw still fails with libfuse's own words in the message instead of a traceback.

Known limits: the checks follow fusermount3's rules (libfuse 3); a mount refused for another
reason (e.g. ``mount_max`` reached, a filesystem type fusermount3 does not mount over) is reported
with libfuse's message only.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyfuse3

from ..core.errors import CowfsError

DEVICE = "/dev/fuse"
FUSE_CONF = "/etc/fuse.conf"
FUSERMOUNT = "fusermount3"
#: Where libfuse looks for fusermount3 first (its build-time FUSERMOUNT_DIR), then on PATH.
FUSERMOUNT_DIRS = ("/usr/bin", "/bin", "/usr/local/bin")

#: The flags a container needs for FUSE mounts (docker run, podman run).
CONTAINER_FLAGS = "--device /dev/fuse --cap-add SYS_ADMIN"
CAP_SYS_ADMIN = 21
#: Files that container engines create (docker: /.dockerenv; podman: /run/.containerenv).
CONTAINER_MARKERS = ("/.dockerenv", "/run/.containerenv")

def _device_hint() -> str:
    """What an administrator can do: the Debian default mode, or access for this user alone (an
    ACL), or the device's group where it is not root's."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    hint = (f"ask an administrator to make it 0666 (chmod 0666 {DEVICE}, the Debian default) or "
            f"to give you access to it (setfacl -m u:{user}:rw {DEVICE}")
    with contextlib.suppress(OSError, KeyError):
        group = grp.getgrgid(os.stat(DEVICE).st_gid).gr_name
        if group != "root":
            hint += f", or membership of its group {group!r}"
    return hint + ")"


_ALLOW_OTHER_HINT = (f"a plain user may use -o allow_other only when {FUSE_CONF} has a line "
                     "'user_allow_other'; ask an administrator to add it, or mount without "
                     "allow_other")


def preflight(mountpoint: Path, *, allow_other: bool) -> None:
    """Refuse, with the reason and what to do, a mount that libfuse would refuse."""
    _check_privileges()
    _check_device()
    if os.geteuid() == 0 or has_sys_admin():
        # Root, or a user namespace's owner (a private view of ``cowfs run``), mounts with
        # mount(2) itself, wherever and with whatever options.
        return
    _check_fusermount()
    if allow_other and not _user_allow_other():
        raise CowfsError(f"cannot mount with -o allow_other: {_ALLOW_OTHER_HINT}")
    _check_mountpoint(mountpoint)


def in_container() -> bool:
    """Whether this process runs in a container (the engines' marker files, or the ``container``
    variable that podman, systemd-nspawn and LXC set)."""
    # Lower case by convention (systemd's container interface).
    return bool(os.environ.get("container")) or any(  # noqa: SIM112
        os.path.exists(m) for m in CONTAINER_MARKERS)


def _capabilities() -> dict[str, int] | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    caps = {key: int(value, 16) for key, _, value in
            (line.partition(":\t") for line in text.splitlines()) if key in ("CapEff", "CapBnd")}
    return caps if len(caps) == 2 else None


def has_sys_admin() -> bool:
    """Whether this process has CAP_SYS_ADMIN now (root, or the owner of the user namespace it
    is in): libfuse then mounts with mount(2) itself, without fusermount3."""
    caps = _capabilities()
    return caps is not None and bool(caps["CapEff"] & (1 << CAP_SYS_ADMIN))


def may_gain_sys_admin() -> bool:
    """Whether this process has CAP_SYS_ADMIN or could gain it (through set-user-ID root
    fusermount3): it is in the effective or the bounding set. Unknown counts as yes."""
    caps = _capabilities()
    if caps is None:
        return True
    return bool((caps["CapEff"] | caps["CapBnd"]) & (1 << CAP_SYS_ADMIN))


def _check_privileges() -> None:
    """No /dev/fuse, or no CAP_SYS_ADMIN to be had: in a container, name the missing flags of
    ``docker run``; elsewhere say what is missing."""
    device = os.path.exists(DEVICE)
    admin = may_gain_sys_admin()
    if device and admin:
        return
    if in_container():
        missing = [flag for flag, ok in (("--device /dev/fuse", device),
                                         ("--cap-add SYS_ADMIN", admin)) if not ok]
        lacks = " and ".join(what for what, ok in ((f"{DEVICE} does not exist", device),
                                                   ("no CAP_SYS_ADMIN", admin)) if not ok)
        raise CowfsError(f"cannot mount a FUSE filesystem in this container: {lacks}; start "
                         f"the container with {CONTAINER_FLAGS} (missing: {' '.join(missing)})")
    if not admin:
        raise CowfsError("cannot mount: this process cannot gain CAP_SYS_ADMIN (it is not in "
                         "its capability bounding set), which mounting a FUSE filesystem needs; "
                         "run cowfs without that restriction")


def _check_device() -> None:
    try:
        fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise CowfsError(f"{DEVICE} does not exist: load the fuse module (modprobe fuse), "
                             "or in a container pass the device in (--device /dev/fuse)") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise CowfsError(f"cannot open {DEVICE}: permission denied; {_device_hint()}") from None
        raise CowfsError(f"cannot open {DEVICE}: {e.strerror}") from None
    os.close(fd)


def _find_fusermount() -> str | None:
    for directory in FUSERMOUNT_DIRS:
        candidate = os.path.join(directory, FUSERMOUNT)
        if os.path.exists(candidate):
            return candidate
    return shutil.which(FUSERMOUNT)


def _check_fusermount() -> None:
    path = _find_fusermount()
    if path is None:
        raise CowfsError(f"{FUSERMOUNT} is not installed, and a plain user needs it to mount a "
                         "FUSE filesystem; ask an administrator to install the fuse3 package")
    st = os.stat(path)
    if st.st_uid != 0 or not st.st_mode & stat.S_ISUID:
        raise CowfsError(f"{path} is not set-user-ID root, so a plain user cannot mount with it; "
                         f"ask an administrator to run 'chmod u+s {path}' (owned by root)")


def _user_allow_other() -> bool:
    """Whether /etc/fuse.conf allows allow_other for plain users (unknown counts as yes: then
    fusermount3, which reads it as root, has the last word)."""
    try:
        text = Path(FUSE_CONF).read_text(errors="replace")
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return any(line.split("#")[0].strip() == "user_allow_other" for line in text.splitlines())


def _check_mountpoint(mountpoint: Path) -> None:
    """fusermount3's rules: the user may write to the mountpoint, and in a sticky directory
    (such as /tmp) owns it."""
    where = str(mountpoint)
    if not os.access(mountpoint, os.W_OK):
        raise CowfsError(f"you may not write to the mountpoint {where!r}, so you may not mount "
                         "on it; use a directory you own")
    try:
        parent = os.stat(mountpoint.parent)
        own = os.stat(mountpoint)
    except OSError:
        return
    if parent.st_mode & stat.S_ISVTX and own.st_uid != os.getuid():
        raise CowfsError(f"the mountpoint {where!r} is in a sticky directory and not yours, so "
                         "you may not mount on it; use a directory you own")


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """What libfuse and fusermount3 print on fd 2 meanwhile, as lines (filled in at the end)."""
    lines: list[str] = []
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            lines.extend(line.strip() for line in text.splitlines() if line.strip())


def init(operations: pyfuse3.Operations, mountpoint: str, options: set[str]) -> None:
    """``pyfuse3.init``, failing with a :class:`CowfsError` that says why (never a traceback)."""
    with _stderr_captured() as said:
        try:
            pyfuse3.init(operations, mountpoint, options)
            failure = None
        except RuntimeError as e:
            failure = str(e)
    if failure is None:
        return
    reason = said[-1] if said else failure
    raise CowfsError(f"cannot mount {mountpoint!r}: {reason}{_hint(reason)}")


def _hint(reason: str) -> str:
    if DEVICE in reason and ("ermission" in reason or "denied" in reason):
        return f"; {_device_hint()}"
    if "user_allow_other" in reason:
        return f"; {_ALLOW_OTHER_HINT}"
    if "mountpoint" in reason:
        return "; use a directory you own as the mountpoint"
    if "not permitted" in reason and in_container():
        return (f"; the container may not mount: start it with {CONTAINER_FLAGS}, and where "
                "AppArmor or SELinux confine it, also --security-opt apparmor:unconfined "
                "(or label=disable)")
    return ""
