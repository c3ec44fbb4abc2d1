"""Resource bounds: a walk of more files than cowfs may hold descriptors for (issue 5: memory
after walking 100,000 files must stay bounded, inodes are released on forget)."""

from __future__ import annotations

import os
from pathlib import Path

from support import cowfs_mount, tree_state

FD_LIMIT = 2048


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
    wrapper = tmp_path / "cowfs-limited"
    wrapper.write_text(f'#!/bin/sh\nexec prlimit --nofile={FD_LIMIT}:{FD_LIMIT} -- '
                       f'"{cowfs_cmd}" "$@"\n')
    wrapper.chmod(0o755)
    before = tree_state(lower)
    with cowfs_mount([lower], upper, mnt, command=wrapper) as mount:
        assert mount.proc is not None
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
