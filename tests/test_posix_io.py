"""File data on lower-only, upper-only and merged files, differential against the kernel's
overlayfs: mmap with MAP_SHARED writes, descriptors opened before a copy-up, fsync, statvfs."""

from __future__ import annotations

import pytest
from conformance_support import Pair, each_place, standard_pair_fixture

pytestmark = pytest.mark.kernel


pair = pytest.fixture(standard_pair_fixture, name="pair")


@each_place
def test_mmap_shared_writes_reach_the_file(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    before = pair.run(("read", f))
    assert pair.run(("mmap_write", f, 2, b"XY")) == "ok"
    expected = before[:2] + b"XY" + before[4:]
    assert pair.run(("read", f)) == expected
    pair.check()
    pair.run(("remount",))
    assert pair.run(("read", f)) == expected
    pair.check("after remount")


@each_place
def test_mmap_writes_after_growing_the_file(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    assert pair.run(("truncate", f, 10_000)) == "ok"
    assert pair.run(("mmap_write", f, 9_000, b"far")) == "ok"
    assert pair.run(("read", f))[9_000:9_003] == b"far"
    pair.check()


@each_place
def test_a_read_only_descriptor_sees_writes_made_after_it_was_opened(
    pair: Pair, place: str
) -> None:
    """The kernel (since 4.19) reads through the copied-up file even for descriptors opened
    before the copy-up."""
    f = f"{place}_f"
    assert pair.run(("hold", f, "r")) == "ok"
    assert pair.run(("pwrite", f, 0, b"NEW")) == "ok"
    assert pair.run(("fd_read", 0))[:3] == b"NEW"
    assert pair.run(("append", f, b"+end")) == "ok"
    assert pair.run(("fd_read", 0)).endswith(b"+end")
    assert pair.run(("hold", f, "r")) == "ok"
    assert pair.run(("fd_stat", 0)) == pair.run(("fd_stat", 1))
    pair.check()


@each_place
def test_a_read_write_descriptor_and_a_path_write_agree(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    assert pair.run(("hold", f, "rw")) == "ok"
    assert pair.run(("hold", f, "r")) == "ok"
    assert pair.run(("fd_write", 0, 1, b"via-fd")) == "ok"
    assert pair.run(("pwrite", f, 0, b"P")) == "ok"
    data = pair.run(("fd_read", 1))
    assert data[:7] == b"Pvia-fd"
    assert pair.run(("fd_read", 0)) == data
    pair.check()


@each_place
def test_fsync_and_fdatasync(pair: Pair, place: str) -> None:
    assert pair.run(("fsync", f"{place}_f", "w")) == "ok"
    assert pair.run(("fsync", f"{place}_f", "r")) == "ok"
    assert pair.run(("fsync", f"{place}_d", "O_RDONLY|O_DIRECTORY")) == "ok"
    assert pair.run(("pwrite", f"{place}_f", 0, b"synced")) == "ok"
    assert pair.run(("hold", f"{place}_f", "rw")) == "ok"
    assert pair.run(("fd_fsync", 0)) == "ok"
    pair.check()


def test_statvfs(pair: Pair) -> None:
    bsize, frsize, blocks, files, namemax = pair.run(("statvfs",))
    assert namemax == 255
    assert min(bsize, frsize, blocks, files) > 0
    for rel in ("lo_f", "up_d", "mg_e"):
        assert pair.run(("statvfs", rel)) == (bsize, frsize, blocks, files, namemax)
