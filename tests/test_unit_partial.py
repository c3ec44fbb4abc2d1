"""Partial files without a mount (cowfs.core.partial): the data map's logic, and PartialFile on real
files in a temporary directory against a model of the content (a bytearray), with the crash
leftovers a map never recorded, reopening from the stored map (what a remount does) and
completion."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cowfs.core import schema
from cowfs.core.partial import MAX_MAP_BYTES, DataMap, PartialFile, read_map

BS = 4096  # the smallest block a map may have: small files, many blocks

blocks_sets = st.sets(st.integers(0, 200), max_size=40)


def _map_of(blocks: set[int], lower: int = 10**6, valid: int | None = None) -> DataMap:
    dmap = DataMap(BS, lower, lower if valid is None else valid)
    for b in sorted(blocks):
        dmap = dmap.add(b, b + 1)
    return dmap


@given(blocks_sets)
def test_add_is_the_union_and_encoding_round_trips(blocks: set[int]) -> None:
    dmap = _map_of(blocks)
    assert {b for b in range(210) if dmap.has(b)} == blocks
    for (a, b), (c, _) in zip(dmap.ranges, dmap.ranges[1:], strict=False):
        assert a < b < c, "ranges overlap or touch: they must be merged"
    assert DataMap.decode(dmap.encode()) == dmap


@given(blocks_sets, st.integers(0, 210 * BS), st.integers(0, 210 * BS))
def test_segments_cover_the_range_and_say_where_each_byte_is(blocks: set[int], a: int,
                                                             b: int) -> None:
    start, end = min(a, b), max(a, b)
    dmap = _map_of(blocks)
    segments = list(dmap.segments(start, end))
    pos = start
    for first, stop, in_upper in segments:
        assert first == pos
        assert first < stop
        for block in {first // BS, (stop - 1) // BS}:
            assert dmap.has(block) == in_upper
        pos = stop
    assert pos == end


@given(blocks_sets, st.integers(0, 210 * BS))
def test_truncation_drops_blocks_past_the_size_and_lowers_valid(blocks: set[int],
                                                                size: int) -> None:
    dmap = _map_of(blocks).truncated(size)
    assert dmap.valid == min(10**6, size)
    assert {b for b in range(210) if dmap.has(b)} == {b for b in blocks if b * BS < size}


def test_what_the_lower_still_provides() -> None:
    dmap = _map_of({0, 2}, lower=5 * BS - 10)
    assert list(dmap.missing()) == [(BS, 2 * BS), (3 * BS, 5 * BS - 10)]
    assert not dmap.complete
    assert _map_of({0, 1, 2, 3, 4}, lower=5 * BS - 10).complete
    assert DataMap(BS, 100, 0).complete  # truncated to 0 once: nothing comes from below


@pytest.mark.parametrize("value", [
    b"", b"2 4096 10 10 -", b"1 4096 10 10", b"1 4095 10 10 -", b"1 8192 10 11 -",
    b"1 4096 x 10 -", b"1 4096 10 10 3-2", b"1 4096 10 10 0-2,2-3", b"1 4096 10 10 1-2,0-1",
    b"1 4096 10 10 a-b", b"1 4096 10 10 1", b"1 4096 -1 -1 -", b"1 4096 10 10 -1-2",
])
def test_malformed_maps_are_refused(value: bytes) -> None:
    with pytest.raises(ValueError, match="map"):
        DataMap.decode(value)


# --- PartialFile against a model -----------------------------------------------------------------


def _open_path(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_CLOEXEC)


def _make_partial(directory: Path, lower_bytes: bytes) -> tuple[Path, Path]:
    """A lower file and a partial upper copy of it with an empty map, as copy-up makes them."""
    lower, upper = directory / "lower", directory / "upper"
    lower.write_bytes(lower_bytes)
    with open(upper, "wb") as f:
        f.truncate(len(lower_bytes))
    os.setxattr(upper, schema.XATTR_METACOPY, b"")
    os.setxattr(upper, schema.XATTR_DATAMAP,
                DataMap(BS, len(lower_bytes), len(lower_bytes)).encode())
    return lower, upper


@contextlib.contextmanager
def _opened(lower: Path, upper: Path) -> Iterator[PartialFile]:
    up, lo = _open_path(upper), _open_path(lower)
    dmap = read_map(up)
    assert dmap is not None
    opened = PartialFile(up, lo, dmap)
    try:
        yield opened
    finally:
        opened.close()
        os.close(up)
        os.close(lo)


class PartialMachine(RuleBasedStateMachine):
    """A partial file over a lower file, driven by random writes, truncations, garbage left by
    a crash in blocks the map does not hold, reopenings from the stored map and completion; its
    content always equals the model's, and the lower file never changes."""

    def __init__(self) -> None:
        super().__init__()
        root = Path(os.environ["PARTIAL_UNIT_DIR"])
        self.n = getattr(PartialMachine, "_runs", 0) + 1
        PartialMachine._runs = self.n  # type: ignore[attr-defined]
        self.dir = root / f"run{self.n}"
        self.dir.mkdir()
        self.lower_bytes = os.urandom(9 * BS + 123)
        self.lower, self.upper = _make_partial(self.dir, self.lower_bytes)
        self.model = bytearray(self.lower_bytes)
        self.upper_fd = _open_path(self.upper)
        self.lower_fd = _open_path(self.lower)
        self.file = self._open()

    def _open(self) -> PartialFile:
        dmap = read_map(self.upper_fd)
        assert dmap is not None
        return PartialFile(self.upper_fd, self.lower_fd, dmap)

    def teardown(self) -> None:
        self.file.close()
        os.close(self.upper_fd)
        os.close(self.lower_fd)

    @rule(offset=st.integers(0, 12 * BS), size=st.integers(1, 3 * BS))
    def write(self, offset: int, size: int) -> None:
        data = os.urandom(size)
        assert self.file.write(offset, data) == size
        if offset > len(self.model):
            self.model += bytes(offset - len(self.model))
        self.model[offset:offset + size] = data

    @rule(size=st.integers(0, 12 * BS))
    def truncate(self, size: int) -> None:
        self.file.truncate(size)
        del self.model[size:]
        self.model += bytes(size - len(self.model))

    @precondition(lambda self: not self.file.done)
    @rule(block=st.integers(0, 12))
    def crash_leftover(self, block: int) -> None:
        """Data a crash left in a block the map never recorded: it must not show."""
        if self.file.map.has(block) or block * BS >= len(self.model):
            return
        fd = os.open(self.upper, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xee" * min(BS, len(self.model) - block * BS), block * BS)
        finally:
            os.close(fd)

    @rule()
    def persist_and_reopen(self) -> None:
        """What closing and a remount do: the stored map gives the same content."""
        self.file.persist()
        if self.file.done:  # every block came up: an ordinary file now
            assert schema.XATTR_METACOPY not in os.listxattr(self.upper)
            return
        self.file.close()
        self.file = self._open()

    @precondition(lambda self: not self.file.done)
    @rule()
    def complete(self) -> None:
        self.file.complete()
        assert self.file.done
        assert schema.XATTR_DATAMAP not in os.listxattr(self.upper)
        assert schema.XATTR_METACOPY not in os.listxattr(self.upper)
        assert self.upper.read_bytes() == bytes(self.model)

    @invariant()
    def content_is_the_models(self) -> None:
        size = len(self.model)
        assert os.stat(self.upper).st_size == size
        assert self.file.read(0, size + 10) == bytes(self.model)
        if size > 5:
            third, half = size // 3, size // 2
            assert self.file.read(third, half) == bytes(self.model[third:third + half])
        assert self.lower.read_bytes() == self.lower_bytes


def _machine_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARTIAL_UNIT_DIR", str(tmp_path))
    PartialMachine.TestCase.settings = settings(
        max_examples=60, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow])
    PartialMachine.TestCase().runTest()


def test_partial_file_matches_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _machine_test(tmp_path, monkeypatch)


def test_a_map_that_grows_too_long_completes_the_file(tmp_path: Path) -> None:
    lower_bytes = os.urandom(600 * BS)
    lower, upper = _make_partial(tmp_path, lower_bytes)
    model = bytearray(lower_bytes)
    with _opened(lower, upper) as opened:
        block = 0
        while not opened.done:
            assert len(opened.map.encode()) <= MAX_MAP_BYTES
            opened.write(block * BS + 1, b"x")  # every other block: no two ranges merge
            model[block * BS + 1] = ord("x")
            block += 2
        assert block < 600, "the map never overflowed"
        assert upper.read_bytes() == bytes(model)
        assert schema.XATTR_DATAMAP not in os.listxattr(upper)
    assert lower.read_bytes() == lower_bytes


def test_crash_leftovers_past_what_the_lower_provides_read_as_zeros(tmp_path: Path) -> None:
    """A truncation down then up leaves blocks that read as zeros; garbage a crash left there
    (written, never recorded) must stay invisible through a partial write and completion."""
    lower_bytes = os.urandom(4 * BS)
    lower, upper = _make_partial(tmp_path, lower_bytes)
    with _opened(lower, upper) as opened:
        opened.truncate(BS + 10)
        opened.truncate(4 * BS)
        model = bytearray(lower_bytes[:BS + 10]) + bytes(3 * BS - 10)
        fd = os.open(upper, os.O_WRONLY)
        os.pwrite(fd, b"\xee" * (2 * BS), 2 * BS)  # blocks 2 and 3: not in the map
        os.close(fd)
        assert opened.read(0, 4 * BS) == bytes(model)
        opened.write(2 * BS + 5, b"x")
        model[2 * BS + 5] = ord("x")
        assert opened.read(0, 4 * BS) == bytes(model)
        opened.complete()
        assert upper.read_bytes() == bytes(model)
