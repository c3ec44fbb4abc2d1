"""The resolution rule alone (no I/O): which layers make up the object behind a name."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.core.layers import Layer
from cowfs.core.resolve import WHITEOUT, Data, Found, Probe, Real, stack_for_name

F = Found  # brevity in the tables below


def run(probes: list[Probe[str]]) -> tuple[list[str], str | None, int]:
    """Resolve, and also report how many probes were consumed (laziness matters)."""
    consumed = 0

    def gen() -> Iterator[Probe[str]]:
        nonlocal consumed
        for p in probes:
            consumed += 1
            yield p

    taken, rejected = stack_for_name(gen())
    return taken, rejected, consumed


def test_missing_everywhere() -> None:
    assert run([None, None, None]) == ([], None, 3)


def test_upper_file_hides_everything_and_lowers_are_not_probed() -> None:
    assert run([F("up", False), F("low", True), F("low2", False)]) == (["up"], None, 1)


def test_lower_file_when_upper_missing() -> None:
    assert run([None, F("low", False)]) == (["low"], None, 2)


def test_whiteout_hides_below() -> None:
    assert run([WHITEOUT, F("low", False)]) == ([], None, 1)


def test_whiteout_in_middle_layer() -> None:
    assert run([None, WHITEOUT, F("bottom", True)]) == ([], None, 2)


def test_directories_merge() -> None:
    assert run([F("u", True), F("l1", True), None, F("l3", True)]) == (["u", "l1", "l3"], None, 4)


def test_opaque_directory_stops_merging() -> None:
    assert run([F("u", True), F("l1", True, opaque=True), F("l2", True)]) == (["u", "l1"], None, 2)


def test_opaque_upper_directory_alone() -> None:
    assert run([F("u", True, opaque=True), F("l1", True)]) == (["u"], None, 1)


def test_file_below_directory_is_hidden_and_released() -> None:
    assert run([F("u", True), F("l1", False), F("l2", True)]) == (["u"], "l1", 2)


def test_whiteout_below_directory_stops_merging() -> None:
    assert run([F("u", True), WHITEOUT, F("l2", True)]) == (["u"], None, 2)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_only_directories_merge_across_n_layers(n: int) -> None:
    names = [f"d{i}" for i in range(n)]
    assert run([F(x, True) for x in names]) == (names, None, n)


def test_a_files_data_state_is_one_value() -> None:
    """Issue 20: the copy's data state was two flags (``metacopy``, ``partial``) that could say
    "partial but not metacopy"; it is one value, and the flags are read from it."""
    layer = Layer(0, Path("/"), -1, 0)
    states = {data: Real(layer, -1, 0o100644, data=data) for data in Data}
    assert [(r.metacopy, r.partial) for r in states.values()] == [
        (False, False), (True, False), (True, True)]
    assert Real(layer, -1, 0o100644).data is Data.OWN
