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

from cowfs import inodes

_release = inodes.Inode.release


def release(self):
    poisoned = any(os.fstat(real.fd).st_size == {POISON_SIZE} for real in self.reals)
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
