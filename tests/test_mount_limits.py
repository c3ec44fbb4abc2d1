"""Resource bounds: a walk of more files than cowfs may hold descriptors for (issue 5: memory
after walking 100,000 files must stay bounded, inodes are released on forget; issue 19: an inode
holds no descriptor, so the kernel keeps as many as it likes and cowfs's descriptors stay within
its cache).

The daemon raises its descriptor limit as far as it may (as root with CAP_SYS_RESOURCE: to
fs.nr_open, a million), so the test fixes the limit itself: ``prlimit`` sets soft and hard limit,
and as root ``setpriv`` first drops CAP_SYS_RESOURCE from the bounding set, so that the daemon
cannot raise the hard limit on any machine. The daemon's /proc/PID/limits is checked, so a test
that could not fix the limit fails instead of passing with a larger one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from support import cowfs_mount, tree_state

FD_LIMIT = 256
DIRS = 40
FILES_PER_DIR = 500


def limited_command(cowfs_cmd: Path, wrapper: Path) -> Path:
    """A script at ``wrapper`` that runs cowfs with at most FD_LIMIT descriptors; each step
    execs, so the daemon keeps the pid the test started."""
    drop = "setpriv --bounding-set -sys_resource -- " if os.geteuid() == 0 else ""
    wrapper.write_text(f'#!/bin/sh\nexec {drop}prlimit --nofile={FD_LIMIT}:{FD_LIMIT} -- '
                       f'"{cowfs_cmd}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def open_files_limit(pid: int) -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE of a running process."""
    text = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"^Max open files\s+(\d+)\s+(\d+)", text, re.MULTILINE)
    assert found is not None, text
    return int(found[1]), int(found[2])


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_walking_more_files_than_the_descriptor_limit(tmp_path: Path, cowfs_cmd: Path) -> None:
    """Issue 19: an inode costs memory, not descriptors. With 256 descriptors, a walk of 20,000
    files (merged directories: half of them lower, half upper) sees every one, twice, and the
    daemon's descriptors stay bounded whatever the kernel keeps."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in range(DIRS):
        for layer, prefix in ((lower, "l"), (upper, "u")):
            (layer / f"d{d}").mkdir(parents=True)
            for i in range(FILES_PER_DIR // 2):
                (layer / f"d{d}" / f"{prefix}{i}").write_bytes(b"x")
    mnt.mkdir()
    wrapper = limited_command(cowfs_cmd, tmp_path / "cowfs-limited")
    before = tree_state(lower)
    with cowfs_mount([lower], upper, mnt, command=wrapper) as mount:
        assert mount.proc is not None
        pid = mount.proc.pid
        assert open_files_limit(pid) == (FD_LIMIT, FD_LIMIT)
        for _ in range(2):  # cold, then with every inode in the kernel's cache
            seen = 0
            most_fds = 0
            for root, _, files in os.walk(mnt):
                for name in files:
                    os.lstat(os.path.join(root, name))
                    seen += 1
                most_fds = max(most_fds, daemon_fds(pid))
            assert seen == DIRS * FILES_PER_DIR
            assert most_fds < FD_LIMIT // 2 + 64
        assert (mnt / f"d{DIRS - 1}" / f"l{FILES_PER_DIR // 2 - 1}").read_bytes() == b"x"
    assert tree_state(lower) == before
