"""utimensat(2) with UTIME_NOW and UTIME_OMIT on lower-only, upper-only and merged objects,
differential against the kernel's overlayfs (times set on purpose are compared exactly; "recent"
stands for a time that is now)."""

from __future__ import annotations

import pytest
from conformance_support import OLD_NS, Pair, each_place, standard_pair_fixture

pytestmark = pytest.mark.kernel

T1 = OLD_NS + 123_456_789_012
T2 = OLD_NS + 987_654_321_098
KINDS = pytest.mark.parametrize("kind", ["f", "d", "l"], ids=["file", "dir", "symlink"])


pair = pytest.fixture(standard_pair_fixture, name="pair")


@each_place
@KINDS
def test_utime_now_and_omit(pair: Pair, place: str, kind: str) -> None:
    p = f"{place}_{kind}"
    nofollow = kind == "l"

    def utimensat(atime: int | str, mtime: int | str) -> tuple[object, object]:
        assert pair.run(("utimensat", p, atime, mtime, nofollow)) == "ok"
        return pair.run(("times", p))

    assert utimensat(T1, T2) == (T1, T2)
    assert utimensat("omit", "omit") == (T1, T2)
    assert utimensat(T2, "omit") == (T2, T2)
    assert utimensat("omit", T1) == (T2, T1)
    assert utimensat("now", "omit") == ("recent", T1)
    assert utimensat("omit", "now") == ("recent", "recent")
    assert utimensat(T1, T2) == (T1, T2)
    pair.run(("remount",))
    assert pair.run(("times", p)) == (T1, T2)
    pair.check("after remount")


@each_place
def test_utime_through_a_symlink_changes_its_target(pair: Pair, place: str) -> None:
    assert pair.run(("utimensat", f"{place}_l", T1, T2)) == "ok"
    assert pair.run(("times", f"{place}_f")) == (T1, T2)
    pair.check()


@each_place
def test_copy_up_keeps_the_times_of_the_object_and_its_parent(pair: Pair, place: str) -> None:
    """chmod copies a lower file up: its mtime, and its directory's, stay what they were."""
    assert pair.run(("chmod", f"{place}_d/c" if place != "mg" else "mg_d/lc", 0o600)) == "ok"
    assert pair.run(("mtime", f"{place}_d")) == OLD_NS
    pair.check()


@each_place
def test_a_write_makes_mtime_recent(pair: Pair, place: str) -> None:
    assert pair.run(("pwrite", f"{place}_f", 0, b"w")) == "ok"
    assert pair.run(("mtime", f"{place}_f")) == "recent"
    pair.check()


def test_utime_of_a_missing_name(pair: Pair) -> None:
    assert pair.run(("utimensat", "lo_d/nothing", "now", "now")) == "ENOENT"
    pair.check()
