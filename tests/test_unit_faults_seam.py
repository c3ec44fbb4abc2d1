"""The fault-injection seam of cowfs/core/realfs.py, without FUSE (tests/test_faults.py uses it on
real mounts): parsing COWFS_FAULT, counting changes, failing the N-th, killing at it."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowfs.core import realfs
from cowfs.core.errors import CowfsError

MUTATING = ("setxattr", "removexattr", "chmod", "chown", "utimens", "truncate", "create_file",
            "mkdir", "mknod", "mknod_whiteout", "fsync", "ftruncate", "clone", "copy_bytes",
            "symlink", "link", "unlink", "rmdir", "rename")


@pytest.fixture
def armed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Arm from COWFS_FAULT as the daemon does; disarmed again afterwards."""
    monkeypatch.setattr(realfs, "_faults", None)
    yield
    faults = realfs._faults
    if faults is not None and faults.count_file is not None:
        faults.count_file.close()


def _dirfd(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY)


def test_every_mutating_wrapper_carries_the_decorator() -> None:
    for name in MUTATING:
        assert getattr(realfs, name).__wrapped__, f"realfs.{name} is not marked @change"


@pytest.mark.parametrize("spec", ["0:ENOSPC", "x:ENOSPC", "3:ENOPE", "3:kill", "count:", "3"])
def test_bad_specs_are_refused_in_one_line(spec: str) -> None:
    with pytest.raises(CowfsError, match="invalid COWFS_FAULT directive"):
        realfs.parse_faults(spec)


def test_unarmed_changes_are_not_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(realfs, "_faults", None)
    monkeypatch.delenv(realfs.FAULT_ENV, raising=False)
    realfs.arm_faults_from_env()
    fd = _dirfd(tmp_path)
    try:
        realfs.mkdir(fd, "d", 0o755)
    finally:
        os.close(fd)
    assert realfs._faults is None
    assert (tmp_path / "d").is_dir()


def test_count_and_fail_the_nth_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       armed: None) -> None:
    count = tmp_path / "count"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv(realfs.FAULT_ENV, f"3:EDQUOT,count:{count}")
    realfs.arm_faults_from_env()
    fd = _dirfd(work)
    try:
        realfs.mkdir(fd, "a", 0o755)
        realfs.remove_tree(fd, "a")  # one change: the rmdir
        with pytest.raises(OSError) as raised:
            realfs.mkdir(fd, "b", 0o755)
        assert raised.value.errno == errno.EDQUOT
        realfs.symlink(fd, "c", "target")
    finally:
        os.close(fd)
    assert sorted(os.listdir(work)) == ["c"], "the failed change must not have been made"
    lines = count.read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["1", "mkdir"], ["2", "rmdir"], ["3", "mkdir"], ["4", "symlink"]]


def _run_killed(spec: str, changes: Callable[[], None]) -> None:
    """``changes()`` in a child armed with ``COWFS_FAULT=spec``, which must be killed by it."""
    pid = os.fork()
    if pid == 0:
        try:
            os.environ[realfs.FAULT_ENV] = spec
            realfs.arm_faults_from_env()
            changes()
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status), f"not killed: {status}"
    assert os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize(("action", "made"), [("kill-before", False), ("kill-after", True)])
def test_kill_before_and_after_the_nth_change(tmp_path: Path, action: str, made: bool) -> None:
    def two_changes() -> None:  # killed at the second
        fd = _dirfd(tmp_path)
        realfs.mkdir(fd, "first", 0o755)
        realfs.mkdir(fd, "second", 0o755)

    _run_killed(f"2:{action}", two_changes)
    assert (tmp_path / "first").is_dir()
    assert (tmp_path / "second").is_dir() is made


def test_kill_after_a_change_that_failed(tmp_path: Path) -> None:
    """A crash can follow a failed call too (a create in place that meets a whiteout, EEXIST,
    before the work-dir build): kill-after kills after it; it let the operation run on, and
    the full enumeration took that for a missed kill (create/mknod/mkdir/symlink/link over a
    whiteout)."""
    (tmp_path / "taken").mkdir()

    def failed_then_another() -> None:  # killed after the first, which fails
        fd = _dirfd(tmp_path)
        with contextlib.suppress(FileExistsError):
            realfs.mkdir(fd, "taken", 0o755)
        realfs.mkdir(fd, "after", 0o755)

    _run_killed("1:kill-after", failed_then_another)
    assert not (tmp_path / "after").exists()
