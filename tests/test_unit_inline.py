"""The bound on what a handler copies on the request loop (cowfs/core/inline.py), without FUSE: a
copy larger than COPY_MAX, or from a filesystem that is not a local block device, stops before it
starts (and before the fault-injection seam counts it as a change), only while a handler runs
inline."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.core import inline, realfs


@pytest.fixture
def files(tmp_path: Path) -> Iterator[tuple[int, int]]:
    (tmp_path / "src").write_bytes(b"x" * (inline.COPY_MAX + 1))
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    yield src, dst
    os.close(src)
    os.close(dst)


def test_outside_a_handler_any_copy_runs(files: tuple[int, int]) -> None:
    src, dst = files
    realfs.copy_data(src, dst, inline.COPY_MAX + 1, reflink=False)
    assert os.fstat(dst).st_size == inline.COPY_MAX + 1


def test_on_the_loop_a_large_copy_stops_before_it_starts(
        files: tuple[int, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = files
    count = tmp_path / "count"
    monkeypatch.setattr(realfs, "_faults", realfs.parse_faults(f"count:{count}"))
    try:
        with inline.on_loop(), pytest.raises(inline.TooLongError) as raised:
            realfs.copy_data(src, dst, inline.COPY_MAX + 1, reflink=False)
        assert raised.value.errno == errno.EWOULDBLOCK
        with inline.on_loop(), pytest.raises(inline.TooLongError):
            realfs.copy_range(src, dst, 0, inline.COPY_MAX + 1)
    finally:
        faults = realfs._faults
        assert faults is not None
        assert faults.count_file is not None
        faults.count_file.close()
    assert os.fstat(dst).st_size == 0, "the copy started"
    assert count.read_text() == "", "a copy that never started was counted as a change"


def test_on_the_loop_a_small_copy_runs_from_a_local_disk_only(files: tuple[int, int]) -> None:
    src, dst = files
    with inline.on_loop():
        if inline.is_local(src):
            realfs.copy_range(src, dst, 0, inline.COPY_MAX)
            assert os.fstat(dst).st_size == inline.COPY_MAX
        else:  # tmpfs (or another anonymous device) under the test's directory
            with pytest.raises(inline.TooLongError, match="not a local block device"):
                realfs.copy_range(src, dst, 0, inline.COPY_MAX)


def test_the_mark_ends_with_the_handler_even_when_it_fails(files: tuple[int, int]) -> None:
    src, dst = files
    with pytest.raises(RuntimeError), inline.on_loop():
        raise RuntimeError("handler failed")
    realfs.copy_data(src, dst, inline.COPY_MAX + 1, reflink=False)  # not refused: off the loop


def test_anonymous_devices_are_not_local(tmp_path: Path) -> None:
    fd = os.open("/proc/self/status", os.O_RDONLY)  # procfs: an anonymous device
    try:
        assert not inline.is_local(fd)
    finally:
        os.close(fd)
