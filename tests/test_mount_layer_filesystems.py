"""The filesystems datasets live on (issue 11, section 3), each set up by the test itself
(tests/fs_support.py) and always torn down:

- a lower on sshfs over a loopback sshd: a remote filesystem without xattrs, so whiteouts and
  opaque marks live only in the upper;
- a lower on read-only images: squashfs (the kernel's, through a loop device, and squashfuse, a
  plain user's way) and EROFS;
- an upper on XFS (reflinks) and Btrfs loop images, where copy-up clones, and on tmpfs;
- every layer on a different filesystem: st_ino unique and stable across remounts.

Each configuration runs the same session (lookups, reads, copy-up, whiteouts, an opaque
directory, renames of a file and of a directory with lower content) and must show what the same
session shows with every layer in a plain directory, before and after a remount. The mount
fixture checks at teardown that the lowers did not change and that ``cowfs check`` finds the
upper sound.

As a plain user (make test-user) the kernel mounts skip (they need root); squashfuse and sshfs
run. NFS is not in this kernel: docs/layer-format.md says what would differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LayerFactory, LayerSet, MountFactory
from fs_support import (
    FIEMAP_EXTENT_SHARED,
    erofs_image,
    fiemap_extents,
    mounted_image,
    scratch_fs,
    squashfs_image,
    squashfuse_mount,
    sshfs_mount,
)
from support import (
    OPAQUE_XATTR,
    CowfsMount,
    File,
    Spec,
    build_layer,
    getxattr_or_none,
    is_whiteout,
    merged_view,
)

from cowfs.core import realfs

pytestmark = pytest.mark.timeout(180)

BIG = 8 << 20
LOWER: Spec = {
    "a.txt": None,
    "dir/x": None,
    "dir/y": None,
    "dir/sub/z": None,
    "gone/f": None,
    "gone/g": None,
    "moved/m": None,
    "run.sh": File(mode=0o755),
    "link@": "a.txt",
    "big": b"\x5a" * BIG,
}


def session(root: Path) -> None:
    """What a dataset job does to its view."""
    assert (root / "a.txt").read_text() == "lower0:a.txt"
    assert sorted(os.listdir(root / "dir")) == ["sub", "x", "y"]
    with open(root / "dir" / "x", "a") as f:  # copy-up
        f.write("+appended")
    (root / "dir" / "y").unlink()  # a whiteout
    for name in ("f", "g"):
        (root / "gone" / name).unlink()
    (root / "gone").rmdir()
    (root / "gone").mkdir()  # opaque: nothing of the lower shows through
    (root / "gone" / "new").write_text("new")
    os.rename(root / "a.txt", root / "dir" / "a-moved")
    os.rename(root / "moved", root / "moved-dir")  # a directory with lower content
    with open(root / "big", "r+b") as f:  # copy-up of a large file
        f.seek(BIG // 2)
        f.write(b"!")
    # A lower without xattrs (sshfs: EOPNOTSUPP) shows none; setting one copies the file up.
    assert os.listxattr(root / "run.sh") == []
    os.setxattr(root / "run.sh", "user.tag", b"set")


def check_upper(upper: Path) -> None:
    """Where the session's marks live: in the upper, whatever the lower's filesystem."""
    assert is_whiteout(upper / "dir" / "y")
    assert getxattr_or_none(upper / "gone", OPAQUE_XATTR) == b"y"
    assert (upper / "dir" / "x").read_text() == "lower0:dir/x+appended"


@pytest.fixture
def reference(layers: LayerFactory, mount_cowfs: MountFactory) -> dict[str, object]:
    """The session's merged view with every layer in a plain directory, after a remount."""
    mount = mount_cowfs(layers(LOWER))
    session(mount.mnt)
    mount.remount()
    return dict(merged_view(mount.mnt))


def run_and_compare(mount: CowfsMount, upper: Path, reference: dict[str, object], *,
                    lower_numbers_last: bool = True) -> None:
    """The session, then a remount: the same view, and the same st_ino for every object; over
    a lower that numbers its files anew at each mount (sshfs, squashfuse), for every object in
    the upper (the others have the lower's numbers, which do not last there either)."""
    session(mount.mnt)
    check_upper(upper)
    assert merged_view(mount.mnt) == reference
    numbers = inode_numbers(mount.mnt)
    mount.remount()
    assert merged_view(mount.mnt) == reference
    after = inode_numbers(mount.mnt)
    if not lower_numbers_last:
        kept = {rel for rel in numbers if os.path.lexists(upper / rel)}
        assert {"dir/x", "dir/a-moved", "big", "run.sh", "gone/new"} <= kept
        numbers = {rel: n for rel, n in numbers.items() if rel in kept}
        after = {rel: n for rel, n in after.items() if rel in kept}
    assert after == numbers


def inode_numbers(root: Path) -> dict[str, int]:
    """st_ino of every object (unique, checked here), by path."""
    numbers = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            numbers[str(path.relative_to(root))] = os.lstat(path).st_ino
    seen: dict[int, str] = {}
    for rel, ino in numbers.items():
        assert ino not in seen, f"{rel} and {seen[ino]} share st_ino {ino}"
        seen[ino] = rel
    return numbers


# --- lowers on other filesystems ---------------------------------------------------------------


@pytest.fixture(params=["sshfs", "squashfs", "squashfuse", "erofs"])
def remote_lower(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """``LOWER`` on the filesystem named by the parameter, mounted (read-only where it can be)
    at a directory of its own; torn down after the mount fixture's checks (requested first)."""
    base = tmp_path / f"fs-{request.param}"
    base.mkdir()
    source = build_layer(base / "source", LOWER, "lower0")
    mnt = base / "mnt"
    if request.param == "sshfs":
        with sshfs_mount(source, mnt, base / "ssh"):
            yield mnt
    elif request.param == "squashfs":
        with mounted_image(squashfs_image(source, base / "lower.sqfs"), "squashfs", mnt):
            yield mnt
    elif request.param == "squashfuse":
        with squashfuse_mount(squashfs_image(source, base / "lower.sqfs"), mnt):
            yield mnt
    else:
        with mounted_image(erofs_image(source, base / "lower.erofs"), "erofs", mnt):
            yield mnt


def test_lower_on_another_filesystem(remote_lower: Path, reference: dict[str, object],
                                     layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """The session over a lower on sshfs, squashfs, squashfuse or EROFS: the same view as over
    a plain directory, the marks in the upper, st_ino unique and stable across a remount."""
    layer_set = layers()
    mount = mount_cowfs(layer_set, lowers=[remote_lower])
    fd = os.open(remote_lower, os.O_PATH | os.O_DIRECTORY)
    try:
        lasting = realfs.numbers_last(fd)
    finally:
        os.close(fd)
    run_and_compare(mount, layer_set.upper, reference, lower_numbers_last=lasting)
    if not lasting:  # nothing in the upper names a lower object by a number that may change
        for path in layer_set.upper.rglob("*"):
            assert not any("cowfs.origin" in name
                           for name in os.listxattr(path, follow_symlinks=False)), path


def test_sshfs_has_no_xattrs(tmp_path: Path) -> None:
    """What makes the sshfs lower different: no xattrs at all, so it cannot carry marks."""
    source = build_layer(tmp_path / "source", {"a.txt": None}, "lower0")
    with sshfs_mount(source, tmp_path / "mnt", tmp_path / "ssh") as mnt, pytest.raises(
            OSError, match="Operation not supported"):
        os.getxattr(mnt / "a.txt", "user.x")


# --- uppers on other filesystems ---------------------------------------------------------------


def layers_on(fs_root: Path, base: LayerSet) -> LayerSet:
    """``LOWER`` and an empty upper on the filesystem at ``fs_root`` (same filesystem, so a
    copy-up can clone); the mount point stays in the base set."""
    lower = build_layer(fs_root / "lower0", LOWER, "lower0")
    upper = fs_root / "upper"
    upper.mkdir()
    work = fs_root / "work"
    work.mkdir()
    return dataclasses.replace(base, lowers=[lower], upper=upper, work=work)


@pytest.fixture(params=["xfs", "btrfs", "tmpfs"])
def upper_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with scratch_fs(request.param, tmp_path, f"fs-{request.param}") as root:
        yield request.param, root


def test_upper_on_another_filesystem(upper_fs: tuple[str, Path], reference: dict[str, object],
                                     layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """The session with lower and upper on XFS (reflink=1), Btrfs or tmpfs. On XFS and Btrfs the
    copy-up of the large file is a clone: its extents are shared with the lower file, and the
    filesystem's used space grows by the one block written, not by the file."""
    kind, root = upper_fs
    layer_set = layers_on(root, layers())
    mount = mount_cowfs(layer_set, work=layer_set.work)
    before = os.statvfs(root)
    run_and_compare(mount, layer_set.upper, reference)
    if kind == "tmpfs":
        return
    after = os.statvfs(root)
    grown = (before.f_bfree - after.f_bfree) * after.f_frsize
    assert grown < BIG // 2, f"copy-up used {grown} bytes: not a clone"
    shared = [e for e in fiemap_extents(layer_set.upper / "big") if e[3] & FIEMAP_EXTENT_SHARED]
    assert sum(e[2] for e in shared) >= BIG // 2, "the upper copy shares no extents"


def test_a_cloned_copy_up_is_not_fsynced_and_a_copied_one_is(
        upper_fs: tuple[str, Path], layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """As in the kernel's ovl_copy_up_file: copied data is fsynced before the rename that makes
    the copy visible, a whole clone is not (it is metadata, which the journal commits in order,
    and it writes back the shared blocks first). The changes the copy-up of a small file makes,
    as the fault-injection seam counts them: on XFS and Btrfs one clone (made on the request
    loop, not tried there first and again in a worker thread: Btrfs's anonymous device numbers
    are a local disk too) and no fsync, on tmpfs (no reflinks) a copy and an fsync."""
    kind, root = upper_fs
    layer_set = layers_on(root, layers())
    count = root / "count"
    mount = mount_cowfs(layer_set, work=layer_set.work, env={"COWFS_FAULT": f"count:{count}"})
    with open(mount.mnt / "a.txt", "a") as f:
        f.write("appended")
    mount.stop()
    assert (layer_set.upper / "a.txt").read_text() == "lower0:a.txt" + "appended"
    changes = [line.split()[1] for line in count.read_text().splitlines()]
    if kind == "tmpfs":
        assert changes.count("copy_bytes") == 1, changes
        assert "fsync" in changes, changes
    else:
        assert changes.count("clone") == 1, changes
        assert "copy_bytes" not in changes, changes
        assert "fsync" not in changes, changes


# --- every layer on a different filesystem -----------------------------------------------------


class RemountableImage:
    """An image mounted at ``mnt`` that the test can unmount and mount again (a new loop
    device, perhaps another st_dev); mounted when the fixture ends, then torn down."""

    def __init__(self, image: Path, fstype: str, mnt: Path) -> None:
        self.image, self.fstype, self.mnt = image, fstype, mnt
        self._stack = contextlib.ExitStack()

    def mount(self) -> None:
        self._stack.enter_context(mounted_image(self.image, self.fstype, self.mnt))

    def remount(self) -> None:
        self._stack.close()
        self.mount()

    def close(self) -> None:
        self._stack.close()


@pytest.fixture
def erofs_lower(tmp_path: Path) -> Iterator[RemountableImage]:
    base = tmp_path / "fs-erofs"
    base.mkdir()
    top = build_layer(base / "source", {"a.txt": None, "dir/top": None, "only0": None},
                      "lower0")
    image = RemountableImage(erofs_image(top, base / "lower0.erofs"), "erofs", base / "mnt")
    try:
        image.mount()
        yield image
    finally:
        image.close()


@pytest.fixture
def tmpfs_root(tmp_path: Path) -> Iterator[Path]:
    with scratch_fs("tmpfs", tmp_path, "fs-tmpfs") as root:
        yield root


def test_st_ino_with_every_layer_on_its_own_filesystem(
        erofs_lower: RemountableImage, tmpfs_root: Path, layers: LayerFactory,
        mount_cowfs: MountFactory) -> None:
    """Lower 0 on EROFS, lower 1 on the test's own filesystem, the upper on tmpfs: st_ino unique
    across the merged view, and the same after remounting cowfs, and after remounting the EROFS
    image too."""
    layer_set = layers({"a.txt": None, "dir/bottom": None, "only1": None, "b/c": None})
    upper = tmpfs_root / "upper"
    upper.mkdir()
    (upper / "dir").mkdir()
    (upper / "dir" / "up").write_text("upper:dir/up")
    layer_set = dataclasses.replace(layer_set, upper=upper)
    mount = mount_cowfs(layer_set, lowers=[erofs_lower.mnt, *layer_set.lowers])
    numbers = inode_numbers(mount.mnt)
    assert numbers.keys() >= {"a.txt", "dir/top", "dir/bottom", "dir/up", "only0", "only1",
                              "b/c"}
    mount.remount()
    assert inode_numbers(mount.mnt) == numbers
    mount.stop()
    erofs_lower.remount()
    mount.start()
    assert inode_numbers(mount.mnt) == numbers
