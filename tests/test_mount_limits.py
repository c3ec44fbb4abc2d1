"""Resource bounds: a walk of more files than cowfs may hold descriptors for (issue 5: memory
after walking 100,000 files must stay bounded, inodes are released on forget).

The daemon raises its descriptor limit as far as it may (as root with CAP_SYS_RESOURCE: to
fs.nr_open, a million), so the test fixes the limit itself: ``prlimit`` sets soft and hard limit,
and as root ``setpriv`` first drops CAP_SYS_RESOURCE from the bounding set, so that the daemon
cannot raise the hard limit on any machine. The daemon's /proc/PID/limits is checked, so a test
that could not fix the limit fails instead of passing without shedding anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from support import cowfs_mount, tree_state

FD_LIMIT = 2048


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


def test_walking_more_files_than_the_descriptor_limit(tmp_path: Path, cowfs_cmd: Path) -> None:
    """cowfs holds a descriptor per layer for each inode the kernel keeps; it asks the kernel to
    drop the least recently used ones before it runs out, so the walk never sees EMFILE."""
    lower, upper, mnt = tmp_path / "lower", tmp_path / "upper", tmp_path / "mnt"
    for d in range(10):
        (lower / f"d{d}").mkdir(parents=True)
        for i in range(600):
            (lower / f"d{d}" / f"f{i}").write_bytes(b"")
    upper.mkdir()
    mnt.mkdir()
    wrapper = limited_command(cowfs_cmd, tmp_path / "cowfs-limited")
    before = tree_state(lower)
    with cowfs_mount([lower], upper, mnt, command=wrapper) as mount:
        assert mount.proc is not None
        assert open_files_limit(mount.proc.pid) == (FD_LIMIT, FD_LIMIT)
        seen = 0
        most_fds = 0
        for root, _, files in os.walk(mnt):
            for name in files:
                os.lstat(os.path.join(root, name))
                seen += 1
            most_fds = max(most_fds, len(os.listdir(f"/proc/{mount.proc.pid}/fd")))
        assert seen == 6000
        assert most_fds < FD_LIMIT
        assert (mnt / "d9" / "f599").exists()
    assert tree_state(lower) == before
