"""Merging directory listings (no I/O)."""

from hypothesis import given
from hypothesis import strategies as st

from cowfs.core.resolve import merge_names


def test_union_keeps_upper_order_first_and_drops_duplicates() -> None:
    assert merge_names([["b", "a"], ["a", "c"], ["d", "b"]]) == ["b", "a", "c", "d"]


def test_hidden_names_are_dropped_in_every_layer() -> None:
    assert merge_names([["x", ".cowfs-work"], [".cowfs-work", "y"]], {".cowfs-work"}) == ["x", "y"]


names = st.lists(st.text(alphabet="abcdef", min_size=1, max_size=3), max_size=8)


@given(st.lists(names, max_size=4))
def test_merge_is_the_ordered_union(listings: list[list[str]]) -> None:
    merged = merge_names(listings)
    assert len(merged) == len(set(merged))
    assert set(merged) == {n for layer in listings for n in layer}
    first_seen = list(dict.fromkeys(n for layer in listings for n in layer))
    assert merged == first_seen
