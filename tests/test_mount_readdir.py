"""Directory listings on a real mount: the union of the layers without duplicates, whiteouts or the
work dir; correct entry types; offsets that stay valid while the directory is read, changed, and
seeked (rm -rf of a 5000-entry merged directory, telldir/seekdir through libc)."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import LayerFactory, MountFactory
from support import (
    DEFAULT_WORK_NAME,
    OPAQUE_USER,
    CowfsMount,
    Dir,
    DirStream,
    Whiteout,
    is_whiteout,
    kind_of,
    run_step,
)

DOTS = (".", "..")


def real(listed: list[str]) -> list[str]:
    """Without "." and "..", which a FUSE filesystem need not list."""
    return [n for n in listed if n not in DOTS]


def names(mount: CowfsMount, rel: str = ".") -> list[str]:
    listed = os.listdir(mount.mnt / rel)
    assert len(listed) == len(set(listed)), f"duplicates in {rel}: {sorted(listed)}"
    return sorted(listed)


# A merged directory of 5000 names over two lowers (1000 in both), with 100 names and 50
# whiteouts in the upper: 5050 visible entries.
BIG_LOWER1 = {f"big/f{i:04}": None for i in range(3000)}
BIG_LOWER0 = {f"big/f{i:04}": None for i in range(2000, 5000)}
BIG_UPPER = {
    **{f"big/u{i:03}": None for i in range(100)},
    **{f"big/f{i:04}": Whiteout("xattr") for i in range(50)},
}
BIG_NAMES = sorted({f"f{i:04}" for i in range(50, 5000)} | {f"u{i:03}" for i in range(100)})


@pytest.fixture
def big(layers: LayerFactory, mount_cowfs: MountFactory) -> CowfsMount:
    return mount_cowfs(layers(BIG_LOWER0, BIG_LOWER1, upper=BIG_UPPER))


@pytest.mark.layers(
    {"d/a": None, "d/w": Whiteout("chardev"), "d/o/": Dir(xattrs=OPAQUE_USER), "d/o/1": None},
    {"d/a": None, "d/b": None, "d/w": None, "d/x": None, "d/o/2": None, "d/e/": None},
    upper={"d/x": Whiteout("xattr"), "d/u": None, "d/b": None},
)
def test_listing_is_the_union_without_duplicates_or_whiteouts(cowfs: CowfsMount) -> None:
    assert names(cowfs, "d") == ["a", "b", "e", "o", "u"]
    assert names(cowfs, "d/o") == ["1"]
    assert names(cowfs, "d/e") == []


def test_work_dir_is_never_shown(cowfs: CowfsMount) -> None:
    assert (cowfs.upper / DEFAULT_WORK_NAME).is_dir()
    assert DEFAULT_WORK_NAME not in names(cowfs)
    assert run_step(cowfs.mnt, ("stat", DEFAULT_WORK_NAME)) == "ENOENT"
    (cowfs.mnt / "new").write_text("x")  # a change after which the upper root is read again
    cowfs.remount()
    assert DEFAULT_WORK_NAME not in names(cowfs)
    assert "new" in names(cowfs)


@pytest.mark.layers(
    {"d/file": None, "d/dir/": None, "d/link@": "file"},
    {"d/dir2/": None, "d/file2": None},
    upper={"d/ufile": None, "d/udir/": None, "d/ulink@": "x"},
)
def test_entry_types_match_lstat(cowfs: CowfsMount) -> None:
    os.mkfifo(cowfs.mnt / "d" / "fifo")
    dtypes = {
        1: "fifo", 2: "chr", 4: "dir", 6: "blk", 8: "file", 10: "symlink", 12: "sock"
    }  # fmt: skip
    with DirStream(cowfs.mnt / "d") as stream:
        listed = stream.read_entries()
    seen = {name: dtypes.get(d_type, f"d_type {d_type}") for name, d_type in listed}
    expected = {n: kind_of(os.lstat(cowfs.mnt / "d" / n)) for n in names(cowfs, "d")}
    assert {n: k for n, k in seen.items() if n not in DOTS} == expected


@pytest.mark.layers(
    {"lonly/a": None, "lonly/b/": None},
    {"deep/only/c": None},
    upper={"uonly/x": None, "uonly/y/": None},
)
def test_unmerged_directories_list_their_one_layer(cowfs: CowfsMount) -> None:
    assert names(cowfs, "lonly") == ["a", "b"]
    assert names(cowfs, "deep/only") == ["c"]
    assert names(cowfs, "uonly") == ["x", "y"]


def test_listing_follows_changes_and_survives_remount(cowfs: CowfsMount) -> None:
    (cowfs.mnt / "dir" / "new").write_text("n")
    os.unlink(cowfs.mnt / "dir" / "x")
    os.rename(cowfs.mnt / "dir" / "w", cowfs.mnt / "dir" / "w2")
    os.mkdir(cowfs.mnt / "dir" / "nd")
    expected = ["nd", "new", "sub", "u", "w2", "y"]
    assert names(cowfs, "dir") == expected
    cowfs.remount()
    assert names(cowfs, "dir") == expected


@pytest.mark.slow
def test_find_lists_a_large_merged_directory_once(big: CowfsMount) -> None:
    out = subprocess.run(
        ["find", str(big.mnt / "big"), "-mindepth", "1", "-printf", "%P\\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(out) == len(BIG_NAMES)
    assert sorted(out) == BIG_NAMES


@pytest.mark.slow
def test_rm_rf_of_a_large_merged_directory(big: CowfsMount) -> None:
    result = subprocess.run(["rm", "-rf", str(big.mnt / "big")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert run_step(big.mnt, ("stat", "big")) == "ENOENT"
    assert is_whiteout(big.upper / "big")
    big.remount()
    assert run_step(big.mnt, ("stat", "big")) == "ENOENT"


@pytest.mark.slow
def test_unlinking_while_reading_sees_every_entry_once(big: CowfsMount) -> None:
    seen = []
    with os.scandir(big.mnt / "big") as entries:
        for entry in entries:
            seen.append(entry.name)
            os.unlink(entry.path)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert sorted(seen) == BIG_NAMES
    assert names(big, "big") == []


@pytest.mark.slow
@pytest.mark.parametrize("first", [10, 1000, 4000])
def test_seekdir_returns_to_a_telldir_position(big: CowfsMount, first: int) -> None:
    with DirStream(big.mnt / "big") as stream:
        head = [stream.read() for _ in range(first)]
        position = stream.tell()
        rest = stream.read_all()
        stream.seek(position)
        assert stream.read_all() == rest
        stream.rewind()
        assert stream.read_all() == head + rest
    everything = real(head + rest)
    assert len(everything) == len(set(everything))
    assert sorted(everything) == BIG_NAMES


@pytest.mark.slow
def test_telldir_positions_stay_valid_after_entries_are_removed(big: CowfsMount) -> None:
    with DirStream(big.mnt / "big") as stream:
        head = [stream.read() for _ in range(2000)]
        position = stream.tell()
        for name in real(head):
            os.unlink(big.mnt / "big" / name)
        stream.seek(position)
        rest = stream.read_all()
    assert not set(real(rest)) & set(head)
    assert sorted(real([*head, *rest])) == BIG_NAMES
