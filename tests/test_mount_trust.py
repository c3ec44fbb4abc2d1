"""What a root daemon believes of an upper another user wrote (docs/architecture.md, "What the
daemon trusts"): root serves a plain user's (uid 65534's) upper with ``allow_other``; nothing the
user writes into it may make cowfs read data the user could not read.

A metacopy mark or a partial file's data map names a lower file by its origin. The user plants
one naming a root-only lower file; reads through the mount fail with EIO (as the kernel refuses to
follow such an origin), and root's offline ``export`` of that upper does not write the secret.
Marks are followed only when the mount's options enable them (``-o metacopy``; partial copy-up),
and the copies root's own changes make in such an upper never leave their data where the upper's
owner could not read it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from conftest import LayerFactory, LayerSet, MountFactory
from support import File, needs_root, run_steps_as
from tools_support import cowfs

from cowfs.core import partial, schema

NOBODY = 65534
SECRET = b"root only: the user must never read this\n"
MiB = 1 << 20


def plant(layer_set: LayerSet, name: str, target: str, *, data_map: bool = False,
          owner: int = NOBODY) -> Path:
    """What the upper's owner (``owner``) can write into it: a file of their own whose mark names
    the lower file ``target`` (size and inode number right)."""
    lower = os.stat(layer_set.lowers[0] / target)
    forged = layer_set.upper / name
    forged.write_bytes(bytes(lower.st_size))
    os.setxattr(forged, schema.XATTR_METACOPY, b"")
    os.setxattr(forged, schema.XATTR_ORIGIN, f"1:{lower.st_ino}:/{target}".encode())
    if data_map:
        os.setxattr(forged, schema.XATTR_DATAMAP,
                    partial.DataMap.empty(lower.st_size).encode())
    os.chown(forged, owner, owner)
    os.chmod(forged, 0o644)
    return forged


def users_upper(layers: LayerFactory) -> LayerSet:
    """Layers with root-only lower files and an upper owned by uid 65534."""
    layer_set = layers({"secret": File(SECRET, mode=0o600),
                        "big-secret": File(SECRET * (MiB // len(SECRET) + 1), mode=0o600),
                        "public": File(b"anyone may read this\n", mode=0o644)}, public=True)
    os.chown(layer_set.upper, NOBODY, NOBODY)
    return layer_set


@pytest.mark.layer_check(False, reason="forged marks, on purpose")
def test_a_users_marks_do_not_read_root_only_lower_data(
        layers: LayerFactory, mount_cowfs: MountFactory, tmp_path: Path) -> None:
    needs_root("a root daemon serving another user's upper")
    layer_set = users_upper(layers)
    plant(layer_set, "meta", "secret")
    plant(layer_set, "part", "big-secret", data_map=True)
    plant(layer_set, "fair", "public")  # data its owner may read: followed
    mount = mount_cowfs(layer_set, options=["metacopy", "allow_other"])
    steps = [("read", "meta"), ("read", "part"), ("read", "fair")]
    assert run_steps_as(NOBODY, NOBODY, mount.mnt, steps) == [
        "EIO", "EIO", b"anyone may read this\n"]
    for name in ("meta", "part"):  # root's reads too: the file has no data
        with pytest.raises(OSError) as info:
            (mount.mnt / name).read_bytes()
        assert info.value.errno == errno.EIO
    mount.stop()
    check = cowfs("check", "--lower", layer_set.lowers[0], layer_set.upper)
    assert check.status == 1, check
    assert check.out.count("metacopy file whose data the lowers do not have") == 2, check
    assert "may not read /secret" in check.out, check
    tar = tmp_path / "layer.tar"
    cowfs("export", "--lower", layer_set.lowers[0], layer_set.upper, "-o", tar)
    if tar.exists():
        assert SECRET not in tar.read_bytes()


@pytest.mark.layer_check(False, reason="marks the options do not enable, on purpose")
def test_marks_are_followed_only_when_the_options_enable_them(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """As the kernel without ``metacopy=on`` (cowfs: ``nometacopy``): a mark (even one whose
    data its owner may read) gives EIO, and a data map without partial copy-up. Marks are
    followed by default (metacopy is on unless ``nometacopy``)."""
    needs_root("files of another owner")
    layer_set = layers({"public": File(b"x" * 4096, mode=0o644)})
    plant(layer_set, "meta", "public", owner=0)
    plant(layer_set, "part", "public", data_map=True, owner=0)
    mount = mount_cowfs(layer_set, options=["nopartial_copyup", "nometacopy"])
    for name in ("meta", "part"):
        with pytest.raises(OSError) as info:
            (mount.mnt / name).read_bytes()
        assert info.value.errno == errno.EIO, name
    mount.stop()
    mount = mount_cowfs(layer_set, options=[])
    assert (mount.mnt / "meta").read_bytes() == b"x" * 4096
    assert (mount.mnt / "part").read_bytes() == b"x" * 4096


def test_roots_copies_in_a_users_upper_carry_their_data(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """Root's own metadata change or write of a root-only file in a user's upper copies the data
    (a metacopy or partial copy would be refused at the next lookup); a file its owner may read
    still copies up without its data."""
    needs_root("a root daemon serving another user's upper")
    layer_set = users_upper(layers)
    mount = mount_cowfs(layer_set, options=["metacopy", "partial_copyup=4096"])
    os.chmod(mount.mnt / "secret", 0o640)
    os.chmod(mount.mnt / "public", 0o640)
    with open(mount.mnt / "big-secret", "r+b") as f:
        f.write(b"R")
    upper = layer_set.upper
    assert schema.XATTR_METACOPY not in os.listxattr(upper / "secret")
    assert schema.XATTR_METACOPY not in os.listxattr(upper / "big-secret")
    assert schema.XATTR_METACOPY in os.listxattr(upper / "public")
    mount.remount()
    assert (mount.mnt / "secret").read_bytes() == SECRET
    assert (mount.mnt / "big-secret").read_bytes()[:2] == b"Ro"
    assert (mount.mnt / "public").read_bytes() == b"anyone may read this\n"
