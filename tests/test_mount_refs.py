"""Name references on a real mount (issue 19, cowfs.core.refs): an inode reaches its real objects by
its parent and its name, and names change under it. The daemon runs with 256 descriptors (a cache
of 80) and the kernel caches nothing (``timeout=0``); between steps the test looks up a crowd of
other files, so that every descriptor the daemon had is dropped and reached again by name.

The interleavings of issue 19: a parent renamed while a child is open, written, or copied up; a
hard link renamed while its other name is read; a name unlinked while its file is open.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from support import cowfs_mount
from test_mount_limits import FD_LIMIT, limited_command, open_files_limit

OPTIONS = ("timeout=0",)
CROWD = 300


def _layers(tmp_path: Path) -> tuple[Path, Path, Path]:
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    (lower / "crowd").mkdir(parents=True)
    for i in range(CROWD):
        (lower / "crowd" / f"c{i}").write_bytes(b"")
    upper.mkdir()
    mnt.mkdir()
    return lower, upper, mnt


def _evict(mnt: Path) -> None:
    """Look up more files than the daemon keeps descriptors for."""
    for i in range(CROWD):
        os.lstat(mnt / "crowd" / f"c{i}")


@pytest.fixture
def wrapper(tmp_path: Path, cowfs_cmd: Path) -> Path:
    return limited_command(cowfs_cmd, tmp_path / "cowfs-limited")


def test_a_parent_renamed_while_a_child_is_open_and_written(tmp_path: Path,
                                                             wrapper: Path) -> None:
    lower, upper, mnt = _layers(tmp_path)
    (lower / "a").mkdir()
    (lower / "a" / "f").write_bytes(b"lower\n")
    with cowfs_mount([lower], upper, mnt, options=OPTIONS, command=wrapper) as mount:
        assert mount.proc is not None
        assert open_files_limit(mount.proc.pid) == (FD_LIMIT, FD_LIMIT)
        ino = os.stat(mnt / "a" / "f").st_ino
        fd = os.open(mnt / "a" / "f", os.O_RDWR)
        try:
            os.pwrite(fd, b"1", 6)
            os.rename(mnt / "a", mnt / "b")
            _evict(mnt)
            os.pwrite(fd, b"2", 7)
            _evict(mnt)
            st = os.fstat(fd)
            assert (st.st_ino, st.st_size) == (ino, 8)
            os.rename(mnt / "b", mnt / "c")
            _evict(mnt)
            os.pwrite(fd, b"3", 8)
        finally:
            os.close(fd)
        _evict(mnt)
        assert os.stat(mnt / "c" / "f").st_ino == ino
        assert (mnt / "c" / "f").read_bytes() == b"lower\n123"
        assert not (mnt / "a").exists()
    assert (upper / "c" / "f").read_bytes() == b"lower\n123"
    assert (lower / "a" / "f").read_bytes() == b"lower\n"


def test_a_parent_renamed_before_a_child_is_copied_up(tmp_path: Path, wrapper: Path) -> None:
    """The child, held by the kernel (and open for reading) under the old name, is copied up
    into the directory's new place; the reader then sees the copy."""
    lower, upper, mnt = _layers(tmp_path)
    (lower / "a" / "deep").mkdir(parents=True)
    (lower / "a" / "deep" / "f").write_bytes(b"lower")
    with cowfs_mount([lower], upper, mnt, options=OPTIONS, command=wrapper):
        with open(mnt / "a" / "deep" / "f", "rb") as reader:
            os.rename(mnt / "a", mnt / "b")
            _evict(mnt)
            with open(mnt / "b" / "deep" / "f", "r+b") as writer:
                writer.write(b"UPPER")
            _evict(mnt)
            assert os.pread(reader.fileno(), 5, 0) == b"UPPER"
        assert sorted(os.listdir(mnt / "b" / "deep")) == ["f"]
    assert (upper / "b" / "deep" / "f").read_bytes() == b"UPPER"


def test_a_parent_renamed_while_a_child_is_being_copied_up(tmp_path: Path,
                                                            wrapper: Path) -> None:
    """A copy-up of a large file runs in a worker thread while its directory is renamed back and
    forth: the copy lands in the directory wherever it is, with all its data."""
    lower, upper, mnt = _layers(tmp_path)
    data = os.urandom(1 << 20) * 16
    for i in range(4):
        (lower / "a" / f"d{i}").mkdir(parents=True)
        (lower / "a" / f"d{i}" / "big").write_bytes(data)
    errors: list[BaseException] = []
    with cowfs_mount([lower], upper, mnt, options=OPTIONS, command=wrapper):
        for i in range(4):
            done = threading.Event()
            # Opened by its directory's descriptor, which follows the renames (a path may not).
            dfd = os.open(mnt / "a" / f"d{i}", os.O_RDONLY | os.O_DIRECTORY)

            def copy(dfd: int = dfd, done: threading.Event = done) -> None:
                try:
                    fd = os.open("big", os.O_WRONLY, dir_fd=dfd)
                    try:
                        os.pwrite(fd, b"!", 0)
                    finally:
                        os.close(fd)
                except BaseException as e:
                    errors.append(e)
                finally:
                    done.set()

            thread = threading.Thread(target=copy)
            thread.start()
            renames = 0
            while not done.is_set() or renames < 2:
                os.rename(mnt / "a" / f"d{i}", mnt / "a" / f"moved{i}")
                os.rename(mnt / "a" / f"moved{i}", mnt / "a" / f"d{i}")
                renames += 1
            thread.join(timeout=60)
            os.close(dfd)
            assert not thread.is_alive()
        assert errors == []
        _evict(mnt)
        for i in range(4):
            assert (mnt / "a" / f"d{i}" / "big").read_bytes() == b"!" + data[1:]
    for i in range(4):
        assert (upper / "a" / f"d{i}" / "big").read_bytes() == b"!" + data[1:]


def test_a_hard_link_renamed_while_its_other_name_is_read(tmp_path: Path, wrapper: Path) -> None:
    lower, upper, mnt = _layers(tmp_path)
    (lower / "h1").write_bytes(b"lower link")
    os.link(lower / "h1", lower / "h2")
    with cowfs_mount([lower], upper, mnt, options=OPTIONS, command=wrapper):
        (mnt / "x").write_bytes(b"upper link")
        os.link(mnt / "x", mnt / "y")
        for first, second in (("x", "y"), ("h1", "h2")):
            ino = os.stat(mnt / second).st_ino
            stop = threading.Event()
            failures: list[BaseException] = []

            def rename(first: str = first, stop: threading.Event = stop,
                       failures: list[BaseException] = failures) -> None:
                try:
                    for _ in range(100):
                        os.rename(mnt / first, mnt / "moved")
                        os.rename(mnt / "moved", mnt / first)
                except BaseException as e:
                    failures.append(e)
                finally:
                    stop.set()

            expected = (mnt / second).read_bytes()
            with open(mnt / second, "rb") as held:
                thread = threading.Thread(target=rename)
                thread.start()
                reads = 0
                while not stop.is_set() or reads < 3:
                    assert (mnt / second).read_bytes() == expected
                    assert os.stat(mnt / second).st_ino == ino
                    assert os.fstat(held.fileno()).st_ino == ino
                    assert os.pread(held.fileno(), 64, 0) == expected
                    if reads % 20 == 0:
                        _evict(mnt)
                    reads += 1
                thread.join(timeout=60)
                assert not thread.is_alive()
            assert failures == []
            _evict(mnt)
            assert os.stat(mnt / first).st_ino == ino
            assert os.stat(mnt / second).st_nlink == 2
    assert (lower / "h1").read_bytes() == b"lower link"


def test_a_name_unlinked_while_its_file_is_open(tmp_path: Path, wrapper: Path) -> None:
    """The object whose name goes stays reachable (pinned) while the kernel holds it."""
    lower, upper, mnt = _layers(tmp_path)
    (lower / "d").mkdir()
    (lower / "d" / "low").write_bytes(b"lower")
    with cowfs_mount([lower], upper, mnt, options=OPTIONS, command=wrapper):
        (mnt / "d" / "up").write_bytes(b"upper")
        for name, content in (("up", b"upper"), ("low", b"lower")):
            fd = os.open(mnt / "d" / name, os.O_RDWR)
            try:
                os.unlink(mnt / "d" / name)
                _evict(mnt)
                os.pwrite(fd, b"!", len(content))
                _evict(mnt)
                assert os.fstat(fd).st_size == len(content) + 1
                assert os.pread(fd, 64, 0) == content + b"!"
            finally:
                os.close(fd)
        assert os.listdir(mnt / "d") == []
    assert (lower / "d" / "low").read_bytes() == b"lower"


def test_renames_of_a_parent_beside_readers_and_a_walk(tmp_path: Path, wrapper: Path) -> None:
    """Three threads: one renames a directory back and forth, one reads and stats an open child
    and the child by whichever name it has, one walks the crowd (so descriptors are dropped and
    reached again all the time). Nothing fails but a path that names the directory's other
    place."""
    lower, upper, mnt = _layers(tmp_path)
    (lower / "p").mkdir()
    (lower / "p" / "child").write_bytes(b"child")
    with cowfs_mount([lower], upper, mnt, options=OPTIONS, command=wrapper):
        ino = os.stat(mnt / "p" / "child").st_ino
        stop = threading.Event()
        failures: list[BaseException] = []

        def renamer() -> None:
            try:
                for _ in range(150):
                    os.rename(mnt / "p", mnt / "q")
                    os.rename(mnt / "q", mnt / "p")
            except BaseException as e:
                failures.append(e)
            finally:
                stop.set()

        def walker() -> None:
            try:
                while not stop.is_set():
                    _evict(mnt)
            except BaseException as e:
                failures.append(e)

        with open(mnt / "p" / "child", "rb") as held:
            threads = [threading.Thread(target=renamer), threading.Thread(target=walker)]
            for thread in threads:
                thread.start()
            seen = 0
            while not stop.is_set() or seen < 3:
                assert os.fstat(held.fileno()).st_ino == ino
                assert os.pread(held.fileno(), 16, 0) == b"child"
                for parent in ("p", "q"):
                    try:
                        assert os.stat(mnt / parent / "child").st_ino == ino
                        seen += 1
                    except FileNotFoundError:
                        pass
            for thread in threads:
                thread.join(timeout=60)
                assert not thread.is_alive()
        assert failures == []
        assert (mnt / "p" / "child").read_bytes() == b"child"
