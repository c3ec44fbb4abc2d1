"""Special files and link counts on lower-only, upper-only and merged objects, differential
against the kernel's overlayfs: mknod (FIFO, character and block devices, sockets), st_nlink
through link, unlink and rename, hard-link sets that start in a lower layer."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from conformance_support import (
    HardLink,
    Pair,
    each_place,
    reference,
    standard_pair_fixture,
    started_pair,
)
from support import File

pytestmark = pytest.mark.kernel

NODES = [
    pytest.param(stat.S_IFIFO | 0o640, 0, 0, "prw-r-----", id="fifo"),
    pytest.param(stat.S_IFCHR | 0o600, 1, 3, "crw-------", id="chardev"),
    pytest.param(stat.S_IFBLK | 0o660, 7, 0, "brw-r-----", id="blockdev"),  # umask 022
    pytest.param(stat.S_IFSOCK | 0o755, 0, 0, "srwxr-xr-x", id="socket"),
]


pair = pytest.fixture(standard_pair_fixture, name="pair")


@each_place
@pytest.mark.parametrize(("mode", "major", "minor", "shown"), NODES)
def test_mknod(pair: Pair, place: str, mode: int, major: int, minor: int, shown: str) -> None:
    for d in (f"{place}_d", f"{place}_e"):
        assert pair.run(("mknod", f"{d}/node", mode, major, minor)) == "ok"
        assert pair.run(("stat", f"{d}/node"))[0] == shown
        assert pair.run(("mknod", f"{d}/node", mode, major, minor)) == "EEXIST"
    assert pair.run(("mknod", f"{place}_f", mode, major, minor)) == "EEXIST"
    pair.check_remounted()


@each_place
def test_mknod_over_a_deleted_lower_name(pair: Pair, place: str) -> None:
    assert pair.run(("unlink", f"{place}_f")) == "ok"
    assert pair.run(("mknod", f"{place}_f", stat.S_IFIFO | 0o644)) == "ok"
    assert pair.run(("stat", f"{place}_f"))[0] == "prw-r--r--"
    pair.check_remounted()


@each_place
def test_link_counts_through_link_unlink_and_rename(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    assert pair.run(("stat", f))[3] == 1
    assert pair.run(("link", f, f"{place}_d/second")) == "ok"
    assert pair.run(("link", f, f"{place}_e/third")) == "ok"
    assert pair.run(("stat", f))[3] == 3
    assert pair.run(("stat", f"{place}_d/second"))[3] == 3
    assert pair.run(("rename", f"{place}_e/third", "moved")) == "ok"
    assert pair.run(("stat", "moved"))[3] == 3
    assert pair.run(("unlink", f)) == "ok"
    assert pair.run(("stat", "moved"))[3] == 2
    assert pair.run(("pwrite", "moved", 0, b"shared")) == "ok"
    assert pair.run(("read", f"{place}_d/second"))[:6] == b"shared"
    pair.check_remounted()


@each_place
def test_link_errors(pair: Pair, place: str) -> None:
    assert pair.run(("link", f"{place}_d", "dirlink")) == "EPERM"
    assert pair.run(("link", f"{place}_f", "up_f")) == "EEXIST"
    assert pair.run(("link", f"{place}_d/nothing", "x")) == "ENOENT"
    assert pair.run(("link", f"{place}_f", "nothing/x")) == "ENOENT"
    pair.check()


@each_place
def test_a_hard_link_to_a_symlink_is_the_symlink(pair: Pair, place: str) -> None:
    assert pair.run(("link", f"{place}_l", "l2")) == "ok"
    assert pair.run(("readlink", "l2")) == f"{place}_f"
    assert pair.run(("stat", "l2"))[3] == 2
    pair.check_remounted()


@each_place
def test_an_open_file_that_was_unlinked_has_no_links(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    content = pair.run(("read", f))
    assert pair.run(("hold", f, "rw")) == "ok"
    assert pair.run(("unlink", f)) == "ok"
    assert pair.run(("fd_stat", 0))[2] == 0
    assert pair.run(("fd_read", 0)) == content
    assert pair.run(("fd_write", 0, 0, b"gone")) == "ok"
    assert pair.run(("close", 0)) == "ok"
    pair.check_remounted()


LOWER_SET = {"a": File(b"one file\n"), "d/": None, "d/b": HardLink("a"), "c": HardLink("a")}


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param([("pwrite", "c", 0, b"ONE")], id="write-one-name"),
        pytest.param([("truncate", "d/b", 2)], id="truncate-one-name"),
        pytest.param([("chmod", "a", 0o600)], id="chmod-one-name"),
        pytest.param([("link", "c", "new"), ("pwrite", "new", 0, b"NEW")], id="link-again"),
        pytest.param([("rename", "c", "d/moved"), ("append", "d/moved", b"+")], id="rename"),
        pytest.param([("pwrite", "a", 0, b"X"), ("remount",), ("append", "c", b"Y")], id="remount"),
    ],
)
def test_a_lower_hard_link_set_stays_one_file(tmp_path: Path, steps: list[tuple]) -> None:
    with started_pair(tmp_path, [LOWER_SET], **reference()) as pair:
        pair.run_all(steps)
        contents = {pair.run(("read", n)) for n in ("a", "d/b", "c")} - {"ENOENT"}
        assert len(contents) == 1
        pair.run(("remount",))
        pair.check("after remount")
