"""The pyfuse3 patches (patches/pyfuse3/) on a filesystem of their own (tests/pyfuse3_probe_fs.py),
without cowfs: what each capability makes the kernel send, counted in the handlers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest
from support import mounted_fstype, unmount, wait_until

PROBE = Path(__file__).with_name("pyfuse3_probe_fs.py")

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3.ReaddirToken, "plus"),
    reason="pyfuse3 without patches/pyfuse3/0001 (make setup builds it; "
           "test_mount_dircache.py fails then)")


class Probe:
    """``script`` (a pyfuse3 filesystem taking ``MOUNTPOINT MODE COUNTS_FILE N``) running."""

    def __init__(self, tmp: Path, mode: str, n: int, script: Path = PROBE) -> None:
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        self.counts_file = tmp / "counts"
        self.log_path = tmp / "log"
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(self.mnt), mode, str(self.counts_file), str(n)],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_mounted(self) -> None:
        assert wait_until(lambda: mounted_fstype(self.mnt) is not None
                          or self.proc.poll() is not None, 20), "the probe did not mount"
        assert self.proc.poll() is None, (self.mnt.parent / "log").read_text()

    def counts(self) -> dict[str, int]:
        before = self.counts_file.stat().st_mtime_ns if self.counts_file.exists() else 0
        os.kill(self.proc.pid, signal.SIGUSR1)
        assert wait_until(lambda: self.counts_file.exists()
                          and self.counts_file.stat().st_mtime_ns != before, 10)
        time.sleep(0.05)
        return {k: int(v) for k, v in
                (line.split() for line in self.counts_file.read_text().splitlines())}

    def stop(self) -> None:
        try:
            if mounted_fstype(self.mnt) is not None:
                unmount(self.mnt, fuse=True)
        finally:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.log.close()


def probe(tmp_path: Path, mode: str, n: int = 50) -> Iterator[Probe]:
    p = Probe(tmp_path, mode, n)
    try:
        p.wait_mounted()
        yield p
    finally:
        p.stop()


def _list_twice(p: Probe, n: int) -> tuple[dict[str, int], dict[str, int]]:
    names = sorted(os.listdir(p.mnt / "d"))
    assert names == [f"f{i:05d}" for i in range(n)]
    first = p.counts()
    assert sorted(os.listdir(p.mnt / "d")) == names
    return first, p.counts()


@pytest.mark.timeout(60)
def test_a_bare_handle_still_works_and_nothing_is_cached(tmp_path: Path) -> None:
    for p in probe(tmp_path, "handle"):
        first, second = _list_twice(p, 50)
        assert second["readdir-plus"] > first["readdir-plus"]
        assert second["opendir"] == first["opendir"] + 1


@pytest.mark.timeout(60)
def test_opendir_fileinfo_with_cache_readdir_caches_the_listing(tmp_path: Path) -> None:
    for p in probe(tmp_path, "fileinfo"):
        first, second = _list_twice(p, 50)
        assert second["opendir"] == first["opendir"] + 1
        assert second["readdir-plus"] == first["readdir-plus"], "the kernel asked again"


@pytest.mark.timeout(60)
def test_enosys_from_opendir_hands_directories_to_the_kernel(tmp_path: Path) -> None:
    for p in probe(tmp_path, "enosys"):
        first, second = _list_twice(p, 50)
        assert first["opendir"] == 1  # the first answer ends them
        assert second["opendir"] == 1
        assert "releasedir" not in second
        assert second["readdir-plus"] == first["readdir-plus"], "the kernel asked again"


@pytest.mark.timeout(60)
def test_readdirplus_auto_asks_for_plain_listings_without_lookup_counts(tmp_path: Path) -> None:
    n = 2000  # many pages: the kernel asks for the first with attributes, the others without
    for p in probe(tmp_path, "enosys+auto", n):
        assert sorted(os.listdir(p.mnt / "d")) == [f"f{i:05d}" for i in range(n)]
        counts = p.counts()
        assert counts.get("readdir-plain", 0) > 0
        assert counts.get("plus-entries", 0) < n
