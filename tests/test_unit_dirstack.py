"""cowfs.core.dirstack without a mount: a bounded number of descriptors at any depth, levels opened
again by name and checked to be the same directory, and the path cache's walk-order reuse."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cowfs.core import dirstack
from cowfs.tools import plans

DEPTH = 300
LIMIT = 8


def chain(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_deep_stack_holds_a_bounded_number_of_descriptors(tmp_path: Path) -> None:
    chain(tmp_path, DEPTH)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    before = open_fds()
    levels = dirstack.fd_stack(root, limit=LIMIT)
    seen = []
    for _ in range(DEPTH):
        fd = os.open("d", os.O_PATH | os.O_DIRECTORY, dir_fd=levels.top())
        levels.push("d", fd)
        seen.append(os.fstat(fd).st_ino)
        assert open_fds() - before <= LIMIT
    for depth in range(DEPTH, 0, -1):  # coming back up re-opens the closed levels
        assert os.fstat(levels.top()).st_ino == seen[depth - 1]
        assert open_fds() - before <= LIMIT
        levels.pop()
    assert levels.top() == root
    levels.close()
    assert open_fds() == before
    os.close(root)


def test_a_level_moved_while_closed_is_an_error(tmp_path: Path) -> None:
    chain(tmp_path, 40)
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    levels = dirstack.fd_stack(root, limit=LIMIT)
    try:
        for _ in range(40):
            levels.push("d", os.open("d", os.O_PATH | os.O_DIRECTORY, dir_fd=levels.top()))
        os.rename(tmp_path / "d/d", tmp_path / "moved")
        (tmp_path / "d/d").mkdir()  # another directory at the same name
        with pytest.raises(dirstack.MovedError, match="moved while cowfs walked"):
            for _ in range(40):
                levels.top()
                levels.pop()
    finally:
        levels.close()
        os.close(root)


def test_path_dirs_reuse_the_last_chain_and_refuse_dotdot(tmp_path: Path) -> None:
    chain(tmp_path, DEPTH)
    (tmp_path / "outside").write_text("x")
    root = os.open(tmp_path / "d", os.O_PATH | os.O_DIRECTORY)
    dirs = dirstack.PathDirs(root)
    try:
        deep = "/".join(["d"] * (DEPTH - 1))  # far past PATH_MAX for a longer name
        inode = os.fstat(dirs.directory(deep)).st_ino
        assert os.fstat(dirs.directory(deep.rpartition("/")[0])).st_ino != inode
        assert os.fstat(dirs.directory(deep)).st_ino == inode
        with pytest.raises(OSError, match="invalid path component"), dirs.parent_of("../outside"):
            pass
        os.symlink("/", tmp_path / "d/link")
        with pytest.raises(NotADirectoryError):
            dirs.directory("link/etc")  # a symlink on the way is never followed
    finally:
        dirs.close()
        os.close(root)
    plans.remove_path(tmp_path / "d")
    assert not (tmp_path / "d").exists()

