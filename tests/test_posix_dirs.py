"""Directories on lower-only, upper-only and merged objects, differential against the kernel's
overlayfs: rmdir of non-empty directories, ENAMETOOLONG, and seekdir/telldir."""

from __future__ import annotations

from pathlib import Path

import pytest
from conformance_support import Pair, each_place, standard_pair_fixture
from support import DirStream

pytestmark = pytest.mark.kernel

NAME_MAX = 255
PATH_MAX = 4096


pair = pytest.fixture(standard_pair_fixture, name="pair")


@each_place
def test_rmdir_of_a_non_empty_directory_is_enotempty(pair: Pair, place: str) -> None:
    d = f"{place}_d"
    assert pair.run(("rmdir", d)) == "ENOTEMPTY"
    assert pair.run(("rmdir", f"{d}/sub" if place != "mg" else d)) == "ENOTEMPTY"
    assert pair.run(("rmdir", f"{place}_f")) == "ENOTDIR"
    assert pair.run(("rmdir", f"{place}_l")) == "ENOTDIR"
    assert pair.run(("rmdir", f"{d}/.")) == "EINVAL"
    assert pair.run(("rmdir", f"{d}/nothing")) == "ENOENT"
    pair.check()


@each_place
def test_rmdir_once_the_lower_content_is_gone_and_mkdir_again_is_empty(
    pair: Pair, place: str
) -> None:
    d = f"{place}_d"
    for name in pair.run(("listdir", d)):
        if name == "sub":
            assert pair.run(("rmdir", f"{d}/sub")) == "ENOTEMPTY"
            assert pair.run(("unlink", f"{d}/sub/x")) == "ok"
            assert pair.run(("rmdir", f"{d}/sub")) == "ok"
        else:
            assert pair.run(("unlink", f"{d}/{name}")) == "ok"
    assert pair.run(("listdir", d)) == []
    assert pair.run(("rmdir", d)) == "ok"
    assert pair.run(("exists", d)) is False
    assert pair.run(("mkdir", d, 0o700)) == "ok"
    assert pair.run(("listdir", d)) == []
    assert pair.run(("stat", d))[0] == "drwx------"
    pair.check_remounted()


@each_place
def test_rmdir_of_an_empty_directory(pair: Pair, place: str) -> None:
    assert pair.run(("rmdir", f"{place}_e")) == "ok"
    assert pair.run(("exists", f"{place}_e")) is False
    pair.check()


@each_place
def test_names_longer_than_name_max(pair: Pair, place: str) -> None:
    d = f"{place}_d"
    long, ok = "n" * (NAME_MAX + 1), "m" * NAME_MAX
    for step in [
        ("open", f"{d}/{long}", "cx"),
        ("mkdir", f"{d}/{long}"),
        ("symlink", "target", f"{d}/{long}"),
        ("link", f"{place}_f", f"{d}/{long}"),
        ("rename", f"{place}_f", f"{d}/{long}"),
        ("mknod", f"{d}/{long}", 0o010644),
        ("stat", f"{d}/{long}"),
        ("unlink", f"{d}/{long}"),
    ]:
        assert pair.run(step) == "ENAMETOOLONG", step
    assert pair.run(("open", f"{d}/{ok}", "cx")) == "ok"
    assert pair.run(("stat", f"{d}/{ok}"))[0] == "-rw-r--r--"
    assert pair.run(("rename", f"{d}/{ok}", f"{place}_e/{ok}")) == "ok"
    pair.check()
    assert pair.run(("unlink", f"{place}_e/{ok}")) == "ok"
    pair.check()


@each_place
def test_paths_longer_than_path_max(pair: Pair, place: str) -> None:
    deep = "/".join([f"{place}_d", *(["x" * 200] * (PATH_MAX // 200 + 1))])
    assert pair.run(("stat", deep)) == "ENAMETOOLONG"
    assert pair.run(("open", deep, "cx")) == "ENAMETOOLONG"
    pair.check()


def listing_from_each_position(mnt: Path, rel: str) -> tuple[list[str], list[list[str]]]:
    """All names of a directory, and for each telldir() position taken during that first pass,
    the names read after seekdir() back to it."""
    with DirStream(mnt / rel) as stream:
        positions, names = stream.read_with_positions()
        rests = []
        for position in reversed(positions):
            stream.seek(position)
            rests.append(stream.read_all())
        stream.rewind()
        assert stream.read_all() == names, "rewinddir must restart the same listing"
    return names, list(reversed(rests))


@each_place
def test_seekdir_returns_to_telldir_positions(pair: Pair, place: str) -> None:
    for name in ("a", "b", "c", "d", "e"):
        pair.run(("open", f"{place}_d/{name}", "cx"))
    for mnt in (pair.kernel, pair.cowfs):
        names, rests = listing_from_each_position(mnt, f"{place}_d")
        for i, rest in enumerate(rests):
            assert rest == names[i:], f"{mnt}: after seekdir to position {i}"
    kernel_names = listing_from_each_position(pair.kernel, f"{place}_d")[0]
    cowfs_names = listing_from_each_position(pair.cowfs, f"{place}_d")[0]
    assert sorted(cowfs_names) == sorted(kernel_names)
    assert {".", ".."} <= set(cowfs_names)
    pair.check()


def listing_after_seeks(mnt: Path, rel: str) -> tuple[list[int], list[str], dict[int, list[str]]]:
    """The telldir() position before each entry, the names, and for each offset below the last
    entry's position that is not a position (one past each position, and 1 to 3), the names read
    after seekdir() to it."""
    with DirStream(mnt / rel) as stream:
        positions, names = stream.read_with_positions()
        wanted = {p + 1 for p in positions} | {1, 2, 3}
        after = {}
        for offset in sorted(o for o in wanted if o not in positions and o < positions[-2]):
            stream.seek(offset)
            after[offset] = stream.read_all()
    return positions, names, after


@each_place
def test_seekdir_to_an_offset_it_did_not_return_goes_on_from_the_next_entry(
    pair: Pair, place: str
) -> None:
    """A seek between two positions reads on to the end of the directory, never an early end:
    on the kernel's overlayfs from the next position of its merged listing (offsets are indexes),
    or from ext4's next hash in a directory that is not merged. cowfs's offsets are indexes
    everywhere: it reads on from the entry at the next position."""
    pair.run(("unlink", f"{place}_f"))  # a whiteout in the merged root
    for name in ("a", "b", "c", "d", "e"):
        pair.run(("open", f"{place}_d/{name}", "cx"))
    pair.run(("unlink", f"{place}_d/c"))
    for mnt in (pair.kernel, pair.cowfs):
        for rel in (".", f"{place}_d"):
            positions, names, after = listing_after_seeks(mnt, rel)
            for offset, rest in after.items():
                where = f"{mnt}/{rel}: after seekdir to {offset}"
                assert rest, where
                assert set(rest) <= set(names), where
                assert names[-1] in rest, where
                if mnt == pair.cowfs:
                    first = next(i for i, p in enumerate(positions) if p >= offset)
                    assert rest == names[first:], where
    pair.check()
