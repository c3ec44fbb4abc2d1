"""Metadata-only copy-up (``cowfs.core.metacopy``) on real mounts and with the offline tools.

A metadata change (chmod, chgrp, utimes, xattrs) or a new name (link, rename) of a lower file
copies no data: the upper copy is sparse and marked ``user.overlay.metacopy``, reads are served by
the lower file, across remounts; the first open for writing (or truncation) gives the upper copy
its data (a copy renamed over it; filled in place when it has several names) and removes the mark.
``diff`` reports a metadata change only; ``export`` and ``commit`` give the full content; ``check``
finds nothing in what cowfs writes, and reports a forged mark; ``reset`` empties the upper; ``-o
nometacopy`` copies the data."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import LayerFactory, MountFactory
from support import CowfsMount, File, cowfs_mount, needs_root
from tools_support import Workspace, cowfs, workspace

__all__ = ["workspace"]  # the fixture, used by name

MARK = "user.overlay.metacopy"
MiB = 1 << 20
BIG = 8 * MiB


def payload(size: int) -> bytes:
    block = bytes(range(256)) * 16  # 4 KiB, every byte value: a misplaced block shows
    return b"".join(i.to_bytes(4, "big") + block[4:] for i in range(size // len(block)))


DATA = payload(BIG)


def upper_blocks(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def is_marked(path: Path) -> bool:
    return MARK in os.listxattr(path)


@pytest.fixture
def big(layers: LayerFactory, mount_cowfs: MountFactory) -> CowfsMount:
    return mount_cowfs(layers({"d/big": File(DATA, mode=0o644), "d/other/": None}),
                       options=["metacopy"])


@pytest.mark.parametrize("change", ["chmod", "chgrp", "utime", "setxattr", "link", "rename"])
def test_metadata_change_copies_no_data(big: CowfsMount, change: str) -> None:
    mnt, path = big.mnt, big.mnt / "d/big"
    if change == "chmod":
        os.chmod(path, 0o600)
    elif change == "chgrp":
        # A plain user may only give a group of their own.
        os.chown(path, -1, 4242 if os.geteuid() == 0 else os.getegid())
    elif change == "utime":
        os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    elif change == "setxattr":
        os.setxattr(path, "user.label", b"x")
    elif change == "link":
        os.link(path, mnt / "d/other/hard")
    else:
        os.rename(path, mnt / "d/other/moved")
        path = mnt / "d/other/moved"
    upper = big.upper / path.relative_to(mnt)
    assert is_marked(upper)
    assert upper_blocks(upper) < 64 * 1024, "the data was copied"
    assert os.stat(upper).st_size == BIG
    assert path.read_bytes() == DATA
    st, lower = os.stat(path), os.stat(big.lowers[0] / "d/big")
    assert (st.st_size, st.st_blocks) == (lower.st_size, lower.st_blocks)
    big.remount()
    assert path.read_bytes() == DATA
    assert is_marked(upper)


def test_first_write_fills_in_place_and_keeps_metadata(big: CowfsMount) -> None:
    path = big.mnt / "d/big"
    os.chmod(path, 0o640)
    os.utime(path, ns=(3_000_000_000, 4_000_000_000))
    os.link(path, big.mnt / "d/other/hard")
    upper = big.upper / "d/big"
    ino = os.stat(upper).st_ino
    reader = os.open(path, os.O_RDONLY)  # opened while the data is the lower file's
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            assert not is_marked(upper)
            st = os.stat(upper)
            assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, 4_000_000_000)
            assert upper_blocks(upper) >= BIG
            os.pwrite(fd, b"PATCH", BIG // 2)
        finally:
            os.close(fd)
        expected = DATA[: BIG // 2] + b"PATCH" + DATA[BIG // 2 + 5:]
        assert os.pread(reader, 5, BIG // 2) == b"PATCH", "an earlier reader sees the write"
    finally:
        os.close(reader)
    assert os.stat(upper).st_ino == ino, "filled in place: the upper inode stays"
    assert (big.mnt / "d/other/hard").read_bytes() == expected, "the hard link sees the data"
    big.remount()
    assert path.read_bytes() == expected
    assert (big.lowers[0] / "d/big").read_bytes() == DATA, "the lower is unchanged"


def test_first_write_of_a_single_name_fills_it_in_place(big: CowfsMount) -> None:
    path = big.mnt / "d/big"
    os.chmod(path, 0o640)
    upper_ino = os.stat(big.upper / "d/big").st_ino
    os.setxattr(path, "user.label", b"kept")
    os.utime(path, ns=(3_000_000_000, 4_000_000_000))
    number = os.stat(path).st_ino
    reader = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(reader, 8, 4096) == DATA[4096:4104]
        with open(path, "r+b") as f:
            st = os.stat(big.upper / "d/big")
            assert not is_marked(big.upper / "d/big")
            assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, 4_000_000_000)
            assert os.getxattr(big.upper / "d/big", "user.label") == b"kept"
            assert st.st_ino == upper_ino, "filled in place, as the kernel does"
            f.seek(4096)
            f.write(b"NEW")
        assert os.pread(reader, 8, 4096) == b"NEW" + DATA[4099:4104]
    finally:
        os.close(reader)
    assert os.stat(path).st_ino == number, "the inode number survives the fill"
    assert os.listdir(big.upper / ".cowfs-work/tmp") == []
    big.remount()
    assert os.stat(path).st_ino == number
    assert path.read_bytes() == DATA[:4096] + b"NEW" + DATA[4099:]


@pytest.mark.parametrize("size", [0, 5, BIG + 100])
def test_truncate_of_a_metacopy_file(big: CowfsMount, size: int) -> None:
    path = big.mnt / "d/big"
    os.chmod(path, 0o600)
    if size == 0:
        os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
    else:
        os.truncate(path, size)
    expected = (DATA + bytes(100))[:size]
    assert path.read_bytes() == expected
    assert not is_marked(big.upper / "d/big")
    big.remount()
    assert path.read_bytes() == expected


def test_chown_to_a_foreign_owner_copies_the_data(big: CowfsMount) -> None:
    needs_root("chown")
    os.chown(big.mnt / "d/big", 4321, -1)
    upper = big.upper / "d/big"
    assert not is_marked(upper)
    assert upper.read_bytes() == DATA


def test_nometacopy_copies_the_data(layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    mount = mount_cowfs(layers({"f": File(b"abc" * 1000)}), options=["nometacopy"])
    os.chmod(mount.mnt / "f", 0o600)
    assert not is_marked(mount.upper / "f")
    assert (mount.upper / "f").read_bytes() == b"abc" * 1000


@pytest.mark.layer_check(False, reason="a forged metacopy mark, on purpose")
def test_forged_mark_is_refused(layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """A file someone else put into the upper with a mark naming a lower file it does not own
    reads nothing of it (EIO), and check reports it."""
    needs_root("files of another owner")
    layer_set = layers({"secret": File(b"root only\n", mode=0o600), "x": None})
    ino = os.stat(layer_set.lowers[0] / "secret").st_ino
    forged = layer_set.upper / "forged"
    forged.write_bytes(bytes(10))
    os.setxattr(forged, MARK, b"")
    os.setxattr(forged, "user.cowfs.origin", f"1:{ino}:/secret".encode())
    os.chown(forged, 1000, 1000)
    os.chmod(forged, 0o644)
    mount = mount_cowfs(layer_set, options=["metacopy"])
    with pytest.raises(OSError) as info:
        (mount.mnt / "forged").read_bytes()
    assert info.value.errno == 5
    assert (mount.mnt / "secret").read_bytes() == b"root only\n"
    mount.stop()
    result = cowfs("check", "--lower", layer_set.lowers[0], layer_set.upper)
    assert result.status == 1
    assert "metacopy file whose data the lowers do not have" in result.out


def test_tools_diff_export_commit_reset(workspace: Workspace) -> None:
    ws = workspace
    (ws.base / "big").write_bytes(DATA)
    with cowfs_mount([ws.base], ws.upper, ws.mnt, options=["metacopy"]):
        os.chmod(ws.mnt / "big", 0o600)
        os.chmod(ws.mnt / "a.txt", 0o600)
        os.rename(ws.mnt / "a.txt", ws.mnt / "moved.txt")
    assert is_marked(ws.upper / "big")
    assert is_marked(ws.upper / "moved.txt")
    a_text = (ws.base / "a.txt").read_bytes()
    check = cowfs("check", "--lower", ws.base, ws.upper)
    assert check.status == 0, check
    diff = cowfs("diff", "--json", "--lower", ws.base, ws.upper)
    assert diff.status == 0, diff
    assert '"path": "big"' in diff.out
    changes = {c["path"]: c for c in json.loads(diff.out)["changes"]}
    assert changes["big"]["change"] == "metadata", changes["big"]
    tar = ws.root / "layer.tar"
    assert cowfs("export", "--lower", ws.base, ws.upper, "-o", tar).status == 0
    with tarfile.open(tar) as archive:
        for name, expected in (("./big", DATA), ("./moved.txt", a_text)):
            member = archive.extractfile(name)
            assert member is not None, name
            assert member.read() == expected, name
    result = cowfs("commit", ws.upper, "--into", ws.base, "--yes")
    assert result.status == 0, result
    assert (ws.base / "big").read_bytes() == DATA
    assert (ws.base / "big").stat().st_mode & 0o777 == 0o600
    assert (ws.base / "moved.txt").read_bytes() == a_text
    assert not (ws.base / "a.txt").exists()
    # reset of an upper holding a metacopy file
    with cowfs_mount([ws.base], ws.upper, ws.mnt, options=["metacopy"]):
        os.chmod(ws.mnt / "big", 0o644)
    assert is_marked(ws.upper / "big")
    assert cowfs("reset", ws.upper, "--yes").status == 0
    assert not (ws.upper / "big").exists()
    assert (ws.base / "big").read_bytes() == DATA


def test_kernel_refuses_a_metacopy_file_of_a_userxattr_lower(
        layers: LayerFactory, mount_cowfs: MountFactory, tmp_path: Path) -> None:
    """As layer-format.md says: the kernel does not follow metacopy with userxattr (EPERM)."""
    needs_root("the kernel's overlayfs")
    layer_set = layers({"f": File(b"data" * 100), "g": File(b"plain")})
    mount = mount_cowfs(layer_set, options=["metacopy"])
    os.chmod(mount.mnt / "f", 0o600)
    mount.stop()
    mnt = tmp_path / "k"
    mnt.mkdir()
    lowers = ":".join(str(p) for p in (layer_set.upper, *layer_set.lowers))
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,userxattr,lowerdir={lowers}",
                    str(mnt)], check=True)
    try:
        assert (mnt / "g").read_bytes() == b"plain"
        with pytest.raises(PermissionError):
            (mnt / "f").read_bytes()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
