"""rename(2) edge cases on lower-only, upper-only and merged objects, differential against the
kernel's overlayfs: onto itself, a directory into its own subtree, a file over a directory and
back, over empty and non-empty directories, RENAME_NOREPLACE and RENAME_EXCHANGE."""

from __future__ import annotations

import pytest
from conformance_support import PLACES, Pair, each_place, standard_pair_fixture
from support import RENAME_EXCHANGE, RENAME_NOREPLACE

pytestmark = pytest.mark.kernel


pair = pytest.fixture(standard_pair_fixture, name="pair")


@each_place
def test_rename_onto_itself_changes_nothing(pair: Pair, place: str) -> None:
    for kind in ("f", "d", "e", "l"):
        name = f"{place}_{kind}"
        assert pair.run(("rename", name, name)) == "ok"
    pair.check_remounted()


@each_place
def test_rename_onto_another_link_of_the_same_file_keeps_both(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    assert pair.run(("link", f, f"{place}_d/f2")) == "ok"
    assert pair.run(("rename", f, f"{place}_d/f2")) == "ok"
    assert pair.run(("exists", f)) is True
    assert pair.run(("stat", f))[3] == 2
    pair.check_remounted()


@each_place
def test_a_directory_into_its_own_subtree_is_einval(pair: Pair, place: str) -> None:
    d = f"{place}_d"
    assert pair.run(("rename", d, f"{d}/inside")) == "EINVAL"
    assert pair.run(("mkdir", f"{d}/new")) == "ok"
    assert pair.run(("rename", d, f"{d}/new/deeper")) == "EINVAL"
    assert pair.run(("rename", d, f"{d}/new")) == "EINVAL"
    assert pair.run(("rename", f"{d}/new", d)) == "ENOTEMPTY"
    pair.check()


@each_place
def test_a_file_over_a_directory_and_back(pair: Pair, place: str) -> None:
    f, e = f"{place}_f", f"{place}_e"
    assert pair.run(("rename", f, e)) == "EISDIR"
    assert pair.run(("rename", e, f)) == "ENOTDIR"
    assert pair.run(("rename", f, e, RENAME_EXCHANGE)) == "ok"
    assert pair.run(("stat", f))[0][0] == "d"
    assert pair.run(("stat", e))[0][0] == "-"
    assert pair.run(("rename", e, f, RENAME_EXCHANGE)) == "ok"
    assert pair.run(("stat", f))[0][0] == "-"
    pair.check_remounted()


@each_place
def test_over_a_non_empty_directory_is_enotempty(pair: Pair, place: str) -> None:
    assert pair.run(("mkdir", "fresh")) == "ok"
    for target in PLACES:
        assert pair.run(("rename", "fresh", f"{target}_d")) == "ENOTEMPTY"
    assert pair.run(("rename", f"{place}_e", f"{place}_d")) == "ENOTEMPTY"
    pair.check()


@each_place
def test_over_an_empty_directory_replaces_it(pair: Pair, place: str) -> None:
    assert pair.run(("mkdir", "fresh")) == "ok"
    assert pair.run(("open", "fresh/inside", "cx")) == "ok"
    assert pair.run(("rename", "fresh", f"{place}_e")) == "ok"
    assert pair.run(("listdir", f"{place}_e")) == ["inside"]
    pair.check_remounted()


@each_place
def test_over_a_directory_emptied_of_its_lower_content(pair: Pair, place: str) -> None:
    d = f"{place}_d"
    for name in pair.run(("listdir", d)):
        step = ("rmdir" if name == "sub" else "unlink", f"{d}/{name}")
        if name == "sub":
            assert pair.run(("unlink", f"{d}/sub/x")) == "ok"
        assert pair.run(step) == "ok"
    assert pair.run(("mkdir", "fresh")) == "ok"
    assert pair.run(("rename", "fresh", d)) == "ok"
    assert pair.run(("listdir", d)) == []
    pair.check_remounted()


@each_place
def test_a_file_over_files_of_each_place(pair: Pair, place: str) -> None:
    for target in PLACES:
        assert (
            pair.run(("rename", f"{target}_d/c" if target != "mg" else "mg_d/lc", f"{place}_f"))
            == "ok"
        )
    pair.check_remounted()


@each_place
def test_a_directory_with_content_moves_with_its_content(pair: Pair, place: str) -> None:
    d = f"{place}_d"
    before = pair.run(("listdir", d))
    assert pair.run(("rename", d, "up_e/moved")) == "ok"
    assert pair.run(("exists", d)) is False
    assert pair.run(("listdir", "up_e/moved")) == before
    assert pair.run(("mkdir", d)) == "ok"
    assert pair.run(("listdir", d)) == []
    pair.check_remounted()


@each_place
def test_noreplace_and_exchange(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    other = "lo_f" if place != "lo" else "up_f"
    assert pair.run(("rename", f, other, RENAME_NOREPLACE)) == "EEXIST"
    assert pair.run(("rename", f, "nothing", RENAME_EXCHANGE)) == "ENOENT"
    assert pair.run(("rename", f, f"{place}_d/new", RENAME_NOREPLACE)) == "ok"
    assert pair.run(("rename", f"{place}_d/new", other, RENAME_EXCHANGE)) == "ok"
    assert pair.run(("rename", f"{place}_e", f"{place}_d", RENAME_EXCHANGE)) == "ok"
    pair.check_remounted()


@each_place
def test_errors_of_missing_and_invalid_names(pair: Pair, place: str) -> None:
    assert pair.run(("rename", f"{place}_d/nothing", "x")) == "ENOENT"
    assert pair.run(("rename", f"{place}_f", "nothing/x")) == "ENOENT"
    assert pair.run(("rename", f"{place}_f", f"{place}_f/x")) == "ENOTDIR"
    assert pair.run(("rename", f"{place}_d/.", "x")) in ("EBUSY", "EINVAL")
    assert pair.run(("rename", f"{place}_f", f"{place}_d/")) == "ENOTDIR"
    pair.check()
