"""The adapter's error boundary (docs/architecture.md, "Errors") on real mounts: a bug in the
model fails one request with EIO and a logged traceback, never the mount; a request naming what
the daemon no longer knows fails with the errno the kernel's own filesystems give.

A bug is injected into the daemon by a ``sitecustomize`` module on its ``PYTHONPATH`` that wraps
one model function to raise: the tests run the real daemon, on a real mount."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import LayerFactory, MountFactory
from support import injected_env

POISON_SIZE = 12345  # the size of the file whose inode the injected bug breaks

RELEASE_BUG = f"""
import os

from cowfs.daemon import inodes

_release = inodes.Inode.release


def _size(real):
    try:
        return os.fstat(real.fd).st_size
    except OSError:  # reached by name, and that name is gone with its parent (at unmount)
        return None


def release(self):
    # The poisoned file was unlinked: its descriptor is pinned, its size readable.
    poisoned = any(_size(real) == {POISON_SIZE} for real in self.reals)
    _release(self)
    if poisoned:
        raise RuntimeError("injected: a bug in Inode.release")


inodes.Inode.release = release
"""


def test_a_failing_forget_leaves_the_mount_working(
        layers: LayerFactory, mount_cowfs: MountFactory, tmp_path: Path) -> None:
    mount = mount_cowfs(layers({"a": None}), env=injected_env(tmp_path / "site", RELEASE_BUG))
    poison = mount.mnt / "poison"
    poison.write_bytes(bytes(POISON_SIZE))
    poison.unlink()  # the kernel forgets the inode: its release raises
    for _ in range(3):  # a few more requests, so that a dead daemon shows
        (mount.mnt / "after").write_bytes(b"still mounted")
        assert (mount.mnt / "after").read_bytes() == b"still mounted"
        assert sorted(os.listdir(mount.mnt)) == ["a", "after"]
    with pytest.raises(AssertionError, match="printed a traceback"):
        mount.stop()  # the bug's, logged: and the daemon exited cleanly (checked first)
    assert "forget of inode" in mount.output()
    assert "injected: a bug in Inode.release" in mount.output()


#: In the daemon: reading the origin of an upper file of POISON_SIZE bytes fails with EIO while
#: ``armed`` exists in COWFS_TEST_PAUSE_DIR.
ORIGIN_READ_FAILS = f"""
import errno
import os
from pathlib import Path

from cowfs.core import realfs

_getxattr = realfs.getxattr
_armed = Path(os.environ["COWFS_TEST_PAUSE_DIR"]) / "armed"


def getxattr(fd, name):
    if (name == "user.cowfs.origin" and _armed.exists()
            and os.fstat(fd).st_size == {POISON_SIZE}):
        raise OSError(errno.EIO, "injected: cannot read the origin")
    return _getxattr(fd, name)


realfs.getxattr = getxattr
"""


def test_a_link_is_reported_as_made_once_it_is_made(
        layers: LayerFactory, mount_cowfs: MountFactory, tmp_path: Path) -> None:
    """After the commit point of link, nothing is left that may fail and report the new name
    as not made (the origin of the object was read there again; a failure also leaked the new
    name's descriptor)."""
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {**injected_env(tmp_path / "site", ORIGIN_READ_FAILS),
           "COWFS_TEST_PAUSE_DIR": str(pause)}
    mount = mount_cowfs(layers({"a": None}), env=env)
    source = mount.mnt / "f"
    source.write_bytes(bytes(POISON_SIZE))
    number = os.stat(source).st_ino
    (pause / "armed").touch()
    os.link(source, mount.mnt / "g")
    (pause / "armed").unlink()
    st = os.stat(mount.mnt / "g")
    assert (st.st_ino, st.st_nlink) == (number, 2)
    mount.remount()
    assert os.stat(mount.mnt / "g").st_ino == os.stat(mount.mnt / "f").st_ino
