"""Filesystems for layers to live on, made by the tests themselves (issue 11, section 3): loop
images (XFS, Btrfs, squashfs, EROFS), squashfuse, tmpfs, and sshfs over a loopback sshd.

Every helper is a context manager that undoes what it did in ``finally``, whatever happened:
unmount (lazily if it is busy), detach the loop device, stop the server it started (by its pid).
A tool that is not installed skips the test with the package that provides it (``make setup``
installs them all: APT_PACKAGES in the Makefile).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from support import needs_root, wait_until

#: The Debian package of each tool the helpers run.
PACKAGES = {
    "mkfs.xfs": "xfsprogs",
    "mkfs.btrfs": "btrfs-progs",
    "mksquashfs": "squashfs-tools",
    "squashfuse": "squashfuse",
    "mkfs.erofs": "erofs-utils",
    "sshfs": "sshfs",
    "sshd": "openssh-server",
    "ssh-keygen": "openssh-client",
    "losetup": "mount",
}

TIMEOUT = 60


def tool(name: str) -> str:
    """The path of a tool, or skip the test saying which package provides it."""
    for directory in ("", "/usr/sbin/", "/sbin/"):
        found = shutil.which(directory + name) if directory else shutil.which(name)
        if found:
            return found
    pytest.skip(f"{name} is not installed (Debian package {PACKAGES.get(name, name)}; make setup)")


def run(cmd: Sequence[str]) -> str:
    """Run a command; on failure, fail with its output."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def fs_available(fstype: str) -> bool:
    return any(line.split()[-1] == fstype
               for line in Path("/proc/filesystems").read_text().splitlines())


def unmount_fs(mnt: Path, *, fuse: bool = False) -> None:
    """Unmount, lazily if the mount is busy; never raises (it runs in finally blocks)."""
    cmd = ["fusermount3", "-u"] if fuse and os.geteuid() != 0 else ["umount"]
    if subprocess.run([*cmd, str(mnt)], capture_output=True, timeout=TIMEOUT,
                      check=False).returncode != 0:
        lazy = ["fusermount3", "-uz"] if fuse and os.geteuid() != 0 else ["umount", "-l"]
        subprocess.run([*lazy, str(mnt)], capture_output=True, timeout=TIMEOUT, check=False)


@contextlib.contextmanager
def loop_device(image: Path, *, read_only: bool = False) -> Iterator[str]:
    """A loop device over ``image``, always detached."""
    losetup = tool("losetup")
    dev = run([losetup, "--find", "--show", *(["--read-only"] if read_only else []),
               str(image)]).strip()
    try:
        yield dev
    finally:
        subprocess.run([losetup, "-d", dev], capture_output=True, timeout=TIMEOUT, check=False)


@contextlib.contextmanager
def mounted_image(image: Path, fstype: str, mnt: Path, options: str = "") -> Iterator[Path]:
    """``image`` mounted at ``mnt`` through a loop device; unmounted and detached on exit."""
    needs_root(f"mount -t {fstype}")
    if not fs_available(fstype):
        pytest.skip(f"this kernel has no {fstype} (/proc/filesystems)")
    mnt.mkdir(exist_ok=True)
    read_only = fstype in ("squashfs", "erofs")
    with loop_device(image, read_only=read_only) as dev:
        opts = ",".join(o for o in ("ro" if read_only else "", options) if o)
        run(["mount", "-t", fstype, *(["-o", opts] if opts else []), dev, str(mnt)])
        try:
            yield mnt
        finally:
            unmount_fs(mnt)


def make_image(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextlib.contextmanager
def scratch_fs(fstype: str, base: Path, name: str, size: int = 512 << 20) -> Iterator[Path]:
    """An empty, writable filesystem of ``fstype`` (xfs with reflinks, btrfs, tmpfs) at
    ``base/name``, made for the test and removed after it."""
    needs_root(f"mount -t {fstype}")
    mnt = base / name
    mnt.mkdir()
    if fstype == "tmpfs":
        run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)])
        try:
            yield mnt
        finally:
            unmount_fs(mnt)
        return
    image = make_image(base / f"{name}.img", size)
    if fstype == "xfs":
        run([tool("mkfs.xfs"), "-q", "-f", "-m", "reflink=1", str(image)])
    elif fstype == "btrfs":
        run([tool("mkfs.btrfs"), "-q", "-f", str(image)])
    else:
        raise AssertionError(f"no recipe for {fstype}")
    try:
        with mounted_image(image, fstype, mnt):
            yield mnt
    finally:
        image.unlink(missing_ok=True)


def squashfs_image(source: Path, image: Path) -> Path:
    run([tool("mksquashfs"), str(source), str(image), "-quiet", "-noappend", "-no-progress"])
    return image


def erofs_image(source: Path, image: Path) -> Path:
    run([tool("mkfs.erofs"), "--quiet", str(image), str(source)])
    return image


@contextlib.contextmanager
def squashfuse_mount(image: Path, mnt: Path) -> Iterator[Path]:
    """A squashfs image mounted by a plain user's means: squashfuse (FUSE), always unmounted."""
    squashfuse = tool("squashfuse")
    mnt.mkdir(exist_ok=True)
    run([squashfuse, str(image), str(mnt)])
    try:
        yield mnt
    finally:
        unmount_fs(mnt, fuse=True)


# --- sshfs over a loopback sshd ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def loopback_sshd(state: Path) -> Iterator[tuple[int, Path]]:
    """An sshd of its own on 127.0.0.1 (own config, host key and client key in ``state``, key
    authentication only, for the user running the tests); yields (port, client key). Stopped by
    its pid on exit."""
    sshd, keygen = tool("sshd"), tool("ssh-keygen")
    state.mkdir(mode=0o700)
    host_key, client_key = state / "host_ed25519", state / "client_ed25519"
    for key in (host_key, client_key):
        run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    (state / "authorized_keys").write_text((state / "client_ed25519.pub").read_text())
    if os.geteuid() == 0:
        # sshd started as root wants its privilege-separation directory (the Debian package's
        # init script makes it at boot).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    port = _free_port()
    # UsePAM: without PAM, sshd refuses an account whose password is locked ("*", as nobody's,
    # the plain user of make test-user) even for key authentication; PAM's account check does not.
    config = state / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1", f"Port {port}", f"HostKey {host_key}",
        f"AuthorizedKeysFile {state / 'authorized_keys'}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin yes",
        "UsePAM yes", "StrictModes no", "PidFile none", "Subsystem sftp internal-sftp",
        "LogLevel ERROR", "",
    ]))
    log = open(state / "sshd.log", "wb")  # noqa: SIM115  (closed in finally)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, start_new_session=True)
    try:
        if not wait_until(lambda: _port_open(port) or proc.poll() is not None, TIMEOUT):
            raise AssertionError("sshd did not start listening")
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited: {(state / 'sshd.log').read_text()}")
        yield port, client_key
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(TIMEOUT)
        log.close()


@contextlib.contextmanager
def sshfs_mount(remote: Path, mnt: Path, state: Path) -> Iterator[Path]:
    """``remote`` (a local directory) mounted at ``mnt`` with sshfs through a loopback sshd of
    the test's own: a remote filesystem, without xattrs."""
    sshfs = tool("sshfs")
    mnt.mkdir(exist_ok=True)
    with loopback_sshd(state) as (port, key):
        user = pwd.getpwuid(os.geteuid()).pw_name
        run([sshfs, f"{user}@127.0.0.1:{remote}", str(mnt), "-o",
             ",".join([f"port={port}", f"IdentityFile={key}", "BatchMode=yes",
                       "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
                       "LogLevel=ERROR", "ServerAliveInterval=5", "reconnect"])])
        try:
            yield mnt
        finally:
            unmount_fs(mnt, fuse=True)


# --- extents ----------------------------------------------------------------------------------

FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_SHARED = 0x2000
_FIEMAP_HEADER = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")


def fiemap_extents(path: Path, max_extents: int = 64) -> list[tuple[int, int, int, int]]:
    """The extents of a file, as (logical, physical, length, flags), synced first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(_FIEMAP_HEADER.size + max_extents * _FIEMAP_EXTENT.size)
        _FIEMAP_HEADER.pack_into(buf, 0, 0, 2**64 - 1, FIEMAP_FLAG_SYNC, 0, max_extents, 0)
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
        count = _FIEMAP_HEADER.unpack_from(buf, 0)[3]
        extents = []
        for i in range(count):
            fields = _FIEMAP_EXTENT.unpack_from(buf, _FIEMAP_HEADER.size + i * _FIEMAP_EXTENT.size)
            extents.append((fields[0], fields[1], fields[2], fields[5]))
        return extents
    finally:
        os.close(fd)
