"""truncate(2) and ftruncate(2) on lower-only, upper-only and merged files, differential against
the kernel's overlayfs."""

from __future__ import annotations

import pytest
from conformance_support import Pair, each_place, standard_pair_fixture

pytestmark = pytest.mark.kernel

SIZES = [0, 3, 100_000]


pair = pytest.fixture(standard_pair_fixture, name="pair")


def expected_after(before: bytes, size: int) -> bytes:
    return before[:size] + bytes(max(0, size - len(before)))


@each_place
@pytest.mark.parametrize("size", SIZES)
def test_truncate_by_path(pair: Pair, place: str, size: int) -> None:
    f = f"{place}_f"
    before = pair.run(("read", f))
    assert pair.run(("truncate", f, size)) == "ok"
    assert pair.run(("read", f)) == expected_after(before, size)
    assert pair.run(("stat", f))[4] == size
    pair.check_remounted()


@each_place
@pytest.mark.parametrize("size", SIZES)
def test_ftruncate_through_a_descriptor(pair: Pair, place: str, size: int) -> None:
    f = f"{place}_f"
    before = pair.run(("read", f))
    assert pair.run(("hold", f, "rw")) == "ok"
    assert pair.run(("fd_truncate", 0, size)) == "ok"
    assert pair.run(("fd_read", 0)) == expected_after(before, size)
    assert pair.run(("fd_stat", 0))[1] == size
    assert pair.run(("fd_write", 0, size, b"!")) == "ok"
    assert pair.run(("close", 0)) == "ok"
    assert pair.run(("read", f)) == expected_after(before, size) + b"!"
    pair.check()


@each_place
def test_ftruncate_of_a_read_only_descriptor_is_refused(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    assert pair.run(("hold", f, "r")) == "ok"
    assert pair.run(("fd_truncate", 0, 0)) == "EINVAL"
    assert pair.run(("close", 0)) == "ok"
    assert pair.run(("read", f)) != b""
    pair.check()


@each_place
def test_truncate_follows_a_symlink(pair: Pair, place: str) -> None:
    assert pair.run(("truncate", f"{place}_l", 1)) == "ok"
    assert pair.run(("read", f"{place}_f")) == pair.run(("read", f"{place}_l"))
    assert pair.run(("stat", f"{place}_f"))[4] == 1
    pair.check()


@each_place
def test_truncate_errors(pair: Pair, place: str) -> None:
    assert pair.run(("truncate", f"{place}_d", 0)) == "EISDIR"
    assert pair.run(("truncate", f"{place}_f", -1)) == "EINVAL"
    assert pair.run(("truncate", f"{place}_d/nothing", 0)) == "ENOENT"
    assert pair.run(("truncate", f"{place}_f/x", 0)) == "ENOTDIR"
    pair.check()


@each_place
def test_shrink_then_grow_reads_zeros_not_old_data(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    assert pair.run(("truncate", f, 2)) == "ok"
    assert pair.run(("truncate", f, 10)) == "ok"
    assert pair.run(("read", f))[2:] == bytes(8)
    pair.check()
