"""Metacopy files in a lower layer (docs/layer-format.md section 11a, "Stacked as a lower layer").

An upper written with metacopy is stacked as a lower by a second cowfs mount
(``lowerdir=OLDUPPER:BASE``): its metacopy files show their data file's content, found from the
origin counted from their own layer; writes and metadata changes through the new mount copy up
the data (or, with metacopy, make an upper metacopy file naming the data file directly); the lower
layers stay byte for byte unchanged (the ``mount_cowfs`` fixture compares them at teardown, and
the tests compare them too); hostile marks in a lower read as EIO, never as another file's data.
The offline tools give the same content. The origin-index rule alone: test_unit_metacopy.py."""

from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path

import pytest
from conftest import LayerFactory, LayerSet, MountFactory
from support import CowfsMount, File, needs_root, tree_state
from tools_support import cowfs

MARK = "user.overlay.metacopy"
ORIGIN = "user.cowfs.origin"
MiB = 1 << 20


def payload(size: int, seed: int) -> bytes:
    block = bytes((seed + i) % 256 for i in range(4096))
    return b"".join(i.to_bytes(4, "big") + block[4:] for i in range(size // 4096))


BIG = payload(4 * MiB, 1)
SMALL = payload(8192, 7)


def is_marked(path: Path) -> bool:
    return MARK in os.listxattr(path)


def sparse(path: Path) -> bool:
    return os.stat(path).st_blocks * 512 < 64 * 1024


def old_upper(layers: LayerFactory, mount_cowfs: MountFactory) -> LayerSet:
    """BASE with two files, and an upper written over it with metacopy: ``d/big`` chmod'ed,
    ``small`` renamed to ``d/moved``, ``d/linked`` given a second name; all three marked."""
    first = layers({"d/big": File(BIG, mode=0o644), "small": File(SMALL, mode=0o644),
                    "d/linked": File(SMALL[::-1], mode=0o644), "d/sub/": None})
    mount = mount_cowfs(first, options=["metacopy"])
    os.chmod(mount.mnt / "d/big", 0o600)
    os.setxattr(mount.mnt / "d/big", "user.label", b"old")
    os.rename(mount.mnt / "small", mount.mnt / "d/moved")
    os.link(mount.mnt / "d/linked", mount.mnt / "d/sub/hard")
    mount.stop()
    for rel in ("d/big", "d/moved", "d/linked"):
        assert is_marked(first.upper / rel), rel
        assert sparse(first.upper / rel), rel
    return first


def stacked(layers: LayerFactory, mount_cowfs: MountFactory, first: LayerSet,
            options: tuple[str, ...] = ()) -> tuple[CowfsMount, LayerSet]:
    second = layers()
    mount = mount_cowfs(second, lowers=[first.upper, *first.lowers], options=list(options))
    return mount, second


def test_a_metacopy_upper_stacked_as_a_lower_reads_the_data(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    first = old_upper(layers, mount_cowfs)
    before = {p: tree_state(p) for p in (first.upper, *first.lowers)}
    mount, _ = stacked(layers, mount_cowfs, first, ("metacopy",))
    mnt = mount.mnt
    assert (mnt / "d/big").read_bytes() == BIG
    assert (mnt / "d/moved").read_bytes() == SMALL
    assert (mnt / "d/linked").read_bytes() == SMALL[::-1]
    assert (mnt / "d/sub/hard").read_bytes() == SMALL[::-1]
    assert not (mnt / "small").exists()
    st, data = os.stat(mnt / "d/big"), os.stat(first.lowers[0] / "d/big")
    assert (st.st_mode & 0o7777, st.st_size, st.st_blocks) == (0o600, len(BIG), data.st_blocks)
    assert os.getxattr(mnt / "d/big", "user.label") == b"old"
    assert MARK not in os.listxattr(mnt / "d/big")
    assert os.stat(mnt / "d/linked").st_ino == os.stat(mnt / "d/sub/hard").st_ino
    mount.remount()
    assert (mnt / "d/big").read_bytes() == BIG
    mount.stop()
    assert {p: tree_state(p) for p in before} == before


def test_without_metacopy_a_stacked_metacopy_file_reads_eio(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """As the kernel refuses to follow a metacopy origin without ``metacopy=on``: the mark is
    not followed, the file has no data (and its own sparse bytes are not shown either)."""
    first = old_upper(layers, mount_cowfs)
    mount, _ = stacked(layers, mount_cowfs, first, ("nometacopy",))
    with pytest.raises(OSError) as info:
        (mount.mnt / "d/big").read_bytes()
    assert info.value.errno == errno.EIO
    assert os.stat(mount.mnt / "d/big").st_mode & 0o7777 == 0o600


def test_changes_through_the_stacked_mount_copy_up_the_data(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    first = old_upper(layers, mount_cowfs)
    before = {p: tree_state(p) for p in (first.upper, *first.lowers)}
    mount, second = stacked(layers, mount_cowfs, first, ("metacopy",))
    mnt = mount.mnt
    number = os.stat(mnt / "d/big").st_ino
    os.chmod(mnt / "d/big", 0o640)
    upper = second.upper / "d/big"
    assert os.stat(mnt / "d/big").st_ino == number, "st_ino survives the copy-up"
    assert is_marked(upper)
    assert sparse(upper)
    # Its origin names the data file in BASE (layer 2 of this stack): no chain.
    data = os.stat(first.lowers[0] / "d/big")
    assert os.getxattr(upper, ORIGIN) == f"2:{data.st_ino}:/d/big".encode()
    assert (mnt / "d/big").read_bytes() == BIG
    assert os.getxattr(upper, "user.label") == b"old"
    # A write gives the upper copy the data file's bytes, with the marked file's metadata.
    with open(mnt / "d/moved", "r+b") as f:
        f.seek(100)
        f.write(b"NEW")
    moved = second.upper / "d/moved"
    assert not is_marked(moved)
    assert moved.read_bytes() == SMALL[:100] + b"NEW" + SMALL[103:]
    assert os.stat(moved).st_mode & 0o7777 == 0o644
    with open(mnt / "d/big", "r+b") as f:
        f.seek(MiB)
        f.write(b"PATCH")
    expected = BIG[:MiB] + b"PATCH" + BIG[MiB + 5:]
    assert not is_marked(upper)
    assert upper.read_bytes() == expected
    assert os.stat(upper).st_mode & 0o7777 == 0o640
    assert os.stat(mnt / "d/big").st_ino == number
    mount.remount()
    assert (mnt / "d/big").read_bytes() == expected
    assert (mnt / "d/moved").read_bytes() == SMALL[:100] + b"NEW" + SMALL[103:]
    assert os.stat(mnt / "d/big").st_ino == number
    mount.stop()
    assert {p: tree_state(p) for p in before} == before


def test_a_hard_linked_lower_metacopy_file_is_copied_up_with_its_data(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    first = old_upper(layers, mount_cowfs)
    mount, _ = stacked(layers, mount_cowfs, first, ("metacopy",))
    with open(mount.mnt / "d/linked", "r+b") as f:
        f.write(b"X")
    expected = b"X" + SMALL[::-1][1:]
    assert (mount.mnt / "d/linked").read_bytes() == expected
    assert (mount.mnt / "d/sub/hard").read_bytes() == expected
    mount.remount()
    assert (mount.mnt / "d/sub/hard").read_bytes() == expected


def test_tools_see_the_data_of_lower_metacopy_files(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    first = old_upper(layers, mount_cowfs)
    mount, second = stacked(layers, mount_cowfs, first, ("metacopy",))
    os.chmod(mount.mnt / "d/big", 0o640)  # an upper metacopy file over a lower one
    with open(mount.mnt / "d/moved", "r+b") as f:
        f.write(b"Z")  # a data change
    os.setxattr(mount.mnt / "d/linked", "user.x", b"1")
    mount.stop()
    lowers = f"{first.upper}:{first.lowers[0]}"
    check = cowfs("check", "--lower", lowers, second.upper)
    assert check.status == 0, check
    diff = cowfs("diff", "--json", "--lower", lowers, second.upper)
    assert diff.status == 0, diff
    changes = {c["path"]: c["change"] for c in json.loads(diff.out)["changes"]}
    assert changes["d/big"] == "metadata", changes
    assert changes["d/moved"] != "metadata", changes
    tar = second.root / "layer.tar"
    assert cowfs("export", "--lower", lowers, second.upper, "-o", tar).status == 0
    with tarfile.open(tar) as archive:
        for name, expected in (("./d/big", BIG), ("./d/moved", b"Z" + SMALL[1:])):
            member = archive.extractfile(name)
            assert member is not None, name
            assert member.read() == expected, name


# --- hostile marks in a lower layer ---------------------------------------------------------------


def hostile(layers: LayerFactory, how: str) -> LayerSet:
    """A lower OLD (above BASE, which holds ``secret``) with a marked file ``forged`` whose origin
    is wrong in the way ``how`` says. OLD says it is a cowfs upper (``user.cowfs.format``): only
    there are marks read."""
    layer_set = layers({"forged": File(bytes(10), mode=0o644)},
                       {"secret": File(b"root only\n", mode=0o600),
                        "dir/secret": File(b"0123456789"), "other": File(b"other data")})
    old, base = layer_set.lowers
    ino = os.stat(base / "secret").st_ino
    forged = old / "forged"
    origin = {
        "wrong owner": f"1:{ino}:/secret",
        "wrong inode": f"1:{os.stat(base / 'other').st_ino + 1000}:/other",
        "dotdot": f"1:{ino}:/dir/../secret",
        "symlink": f"1:{os.stat(base / 'dir/secret').st_ino}:/link/secret",
        "chain": f"1:{ino}:/secret",
    }[how]
    os.setxattr(old, "user.cowfs.format", b"1")
    os.setxattr(forged, MARK, b"")
    os.setxattr(forged, ORIGIN, origin.encode())
    if how == "symlink":
        (old / "link").symlink_to(base / "dir")
        (base / "link").symlink_to(base / "dir")  # a symlink in the data layer itself
    if how == "wrong owner":
        os.chown(forged, 1000, 1000)
        os.chown(old, 0, 0)  # the layer's root is root's: the mark is not trusted for 1000
    if how == "chain":
        os.setxattr(base, "user.cowfs.format", b"1")  # so that its marks are read
        os.setxattr(base / "secret", MARK, b"")  # the data file is marked itself: no chains
    return layer_set


@pytest.mark.layer_check(False, reason="hostile metacopy marks in a lower, on purpose")
@pytest.mark.parametrize("how", ["wrong owner", "wrong inode", "dotdot", "symlink", "chain"])
def test_a_hostile_mark_in_a_lower_reads_eio(layers: LayerFactory, mount_cowfs: MountFactory,
                                             how: str) -> None:
    if how == "wrong owner":
        needs_root("files of another owner")
    layer_set = hostile(layers, how)
    mount = mount_cowfs(layer_set)
    with pytest.raises(OSError) as info:
        (mount.mnt / "forged").read_bytes()
    assert info.value.errno == errno.EIO
    # Copy-up needs the data: EIO too, and nothing of another file reaches the upper.
    with pytest.raises(OSError) as info:
        os.open(mount.mnt / "forged", os.O_WRONLY)
    assert info.value.errno == errno.EIO
    assert not (layer_set.upper / "forged").exists()


@pytest.mark.parametrize("cowfs_upper", [False, True])
def test_marks_are_read_only_in_a_lower_that_is_a_cowfs_upper(
        layers: LayerFactory, mount_cowfs: MountFactory, cowfs_upper: bool) -> None:
    """A lower without ``user.cowfs.format`` (not written by cowfs) is read as it is: a mark in it
    is not looked at (no system call per lookup for it), so the file shows its own bytes."""
    layer_set = layers({"f": File(b"own bytes!")}, {"g": File(b"other data")})
    old, base = layer_set.lowers
    os.setxattr(old / "f", MARK, b"")
    os.setxattr(old / "f", ORIGIN, f"1:{os.stat(base / 'g').st_ino}:/g".encode())
    if cowfs_upper:
        os.setxattr(old, "user.cowfs.format", b"1")
    mount = mount_cowfs(layer_set, options=["metacopy"])
    expected = b"other data" if cowfs_upper else b"own bytes!"
    assert (mount.mnt / "f").read_bytes() == expected


def test_a_partial_file_in_a_lower_reads_its_blocks_and_its_data_files(
        layers: LayerFactory, mount_cowfs: MountFactory, tmp_path: Path) -> None:
    """A partial file (layer-format.md 11b) holds some of its blocks itself: stacked as a lower,
    it shows those and the rest of its data file's; a write through the new mount copies up its
    full content; diff and export of the new upper see the same content."""
    first = layers({"big": File(BIG, mode=0o644), "other": File(BIG, mode=0o644)})
    mount = mount_cowfs(first, options=["partial_copyup=1"])
    for name in ("big", "other"):
        with open(mount.mnt / name, "r+b") as f:
            f.seek(MiB)
            f.write(b"PATCH")
        os.truncate(mount.mnt / name, len(BIG) + 1000)  # past the data file's end: zeros
    mount.stop()
    assert "user.cowfs.datamap" in os.listxattr(first.upper / "big")
    expected = bytearray(BIG + bytes(1000))
    expected[MiB:MiB + 5] = b"PATCH"
    second, second_set = stacked(layers, mount_cowfs, first)
    assert (second.mnt / "big").read_bytes() == bytes(expected)
    st = os.stat(second.mnt / "big")
    assert st.st_size == len(expected)
    assert st.st_blocks * 512 >= len(BIG) // 2, "st_blocks leaves out the data file's share"
    second.remount()
    with open(second.mnt / "big", "rb") as reader:
        assert os.pread(reader.fileno(), 5, MiB) == b"PATCH"  # through the partial file's data
        with open(second.mnt / "big", "r+b") as f:  # copies up its full content
            f.seek(10)
            f.write(b"second")
        expected[10:16] = b"second"
        # The reader opened before the copy-up: the lower partial file's record is retired, not
        # closed (daemon/upperdata.py), and the reader reads on, from the copy.
        assert os.pread(reader.fileno(), 5, 2 * MiB) == bytes(expected[2 * MiB:2 * MiB + 5])
    assert (second.mnt / "big").read_bytes() == bytes(expected)
    assert "user.cowfs.datamap" not in os.listxattr(second_set.upper / "big")
    assert (second_set.upper / "big").read_bytes() == bytes(expected)
    second.stop()
    diff = cowfs("diff", str(second_set.upper), "--lower",
                 f"{first.upper}:{first.lowers[0]}")
    assert diff.status == 0, diff.err
    assert "big" in diff.out
    assert "other" not in diff.out, "an unchanged lower partial file compared as changed"


def test_a_listing_gives_stacked_metacopy_files_their_st_ino(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """``d_ino`` is ``st_ino`` (``find -inum``, ``du`` and ``rsync -H`` trust it) for metacopy
    files of a stacked upper, which are numbered by their data files: also past the first
    chunk of a listing, which the kernel asks for without attributes (plain readdir)."""
    count = 600
    first = layers({f"d/f{i:04d}": File(b"x" * (i + 1)) for i in range(count)})
    mount = mount_cowfs(first, options=["metacopy"])
    for i in range(count):
        os.chmod(mount.mnt / f"d/f{i:04d}", 0o600)
    mount.stop()
    assert is_marked(first.upper / "d/f0599")
    mount, _ = stacked(layers, mount_cowfs, first, ("metacopy",))
    with os.scandir(mount.mnt / "d") as entries:
        listed = {entry.name: entry.inode() for entry in entries}
    assert len(listed) == count
    wrong = {name: (ino, os.lstat(mount.mnt / "d" / name).st_ino)
             for name, ino in listed.items() if ino != os.lstat(mount.mnt / "d" / name).st_ino}
    assert not wrong, f"{len(wrong)} of {count} entries: d_ino != st_ino"
