"""The large-tree profile (issue 19): many files and one very large directory, every FUSE daemon
limited to a small number of descriptors, against the kernel's overlayfs in the same run.

Its own lower layer, built once and cached beside the main fixture (``fixture-scale-...``):
``many/`` (directories of 1,000 empty files: 100,000 in quick mode, 1,000,000 in full mode) and
``huge/`` (one directory of 300,000 empty files). Created with ``open``/``close`` in a loop: a
million files take about a minute on ext4.

For each target, on a fresh mount (the FUSE daemons under ``prlimit --nofile=N:N`` and, as root,
without ``CAP_SYS_RESOURCE``, so that none can raise its own limit):

1. the caches dropped (``drop_caches=3``): ``find many -type f -printf '%s\\n'``, cold;
2. the same walk again, warm (whatever the target lets the kernel cache is cached);
3. the kernel made to forget (``drop_caches=2``: FORGET of every inode, the page cache kept), then
   the walk once more;
4. the caches dropped: ``ls -f huge``, then, the caches dropped again, ``ls -l huge``.

Each walk counts the files it saw and the errors ``find`` reported (a daemon out of descriptors
shows as errors and missing files). After each step the daemon's RSS and open descriptors are
read; RSS per cached inode is the growth from the mount to the end of the cold walk divided by
the inodes the walk made the kernel hold (files and directories).
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import WORKLOAD_TIMEOUT, log, run
from fixture import Fixture, make_empty_files
from targets import FuseTarget, Mounted, Native, Target, fuse_abort
from workloads import cpu_seconds, drop_caches, in_child, open_fds, proc_status, settle

SCALE_VERSION = 1
PER_DIR = 1000
#: Descriptors every FUSE daemon may have during the profile.
FD_LIMIT = 1024
NEWLINE = b"\n"


def scale_fixture(base: Path, files: int, entries: int) -> Path:
    """The lower layer of the profile (``many/``, ``huge/``), built once; its path."""
    key = {"version": SCALE_VERSION, "files": files, "entries": entries}
    root = base / f"fixture-scale-{files}-{entries}"
    stamp = root / "stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return root / "lower"
    if root.exists():
        shutil.rmtree(root)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-scale-", dir=base))
    log(f"building the large-tree fixture in {root}: {files:,} files and a directory of "
        f"{entries:,} (once)")
    lower = tmp / "lower"
    for d in range(max(files // PER_DIR, 1)):
        make_empty_files(lower / "many" / f"d{d:04d}", (f"f{i:04d}" for i in range(PER_DIR)))
    make_empty_files(lower / "huge", (f"entry-{i:06d}" for i in range(entries)))
    (tmp / "stamp.json").write_text(json.dumps({"key": key}))
    run(["sync"], timeout=1200)
    tmp.rename(root)
    return root / "lower"


def _count(cmd: list[str], cwd: Path, pid: int | None) -> dict[str, Any]:
    """Run ``cmd`` in a child; seconds, lines printed, lines of errors, daemon CPU seconds."""
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, check=False, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=WORKLOAD_TIMEOUT)
    return {"seconds": time.perf_counter() - t0, "cpu": cpu_seconds(pid) - cpu0,
            "lines": done.stdout.count(NEWLINE), "errors": done.stderr.count(NEWLINE),
            "status": done.returncode}


def limited(target: Target, limit: int) -> Target:
    """``target`` with its daemon limited to ``limit`` descriptors (FUSE targets only)."""
    if not isinstance(target, FuseTarget):
        return target
    limited_target = copy.copy(target)
    limited_target.fd_limit = limit
    return limited_target


def profile(target: Target, lower: Path, scratch: Path, files: int, entries: int,
            mounted: Callable[[Target, Fixture, Path], Any]) -> dict[str, Any]:
    """The steps above on one fresh mount of ``target``; every number in one dict."""
    fx = Fixture(lower.parent, lower, lower / "none", lower / "none", [], b"")
    dirs = max(files // PER_DIR, 1)
    result: dict[str, Any] = {"files": files, "entries": entries, "dirs": dirs}
    if isinstance(target, Native):
        return _steps(Mounted(lower), result, files)
    with mounted(target, fx, scratch) as m:
        result["fd_limit"] = FD_LIMIT if m.pid is not None else None
        return _steps(m, result, files)


def _steps(m: Mounted, result: dict[str, Any], files: int) -> dict[str, Any]:
    pid = m.pid

    def snap(step: str) -> None:
        if pid is not None:
            result[f"{step}_rss"] = proc_status(pid, "VmRSS")
            result[f"{step}_fds"] = open_fds(pid)

    def timed(step: str, cmd: list[str], where: Path, *, warm_since: int | None = None) -> None:
        """``warm_since``: a warm step, and the count of cache drops before the walk that warmed
        the caches (a drop during that walk leaves part of them cold too)."""
        warm = warm_since is not None
        for attempt in range(3 if warm else 1):
            if attempt or (warm and dropped() != warm_since):
                # Another process dropped the caches: warm them again, and retry.
                log(f"  {step}: the caches were dropped meanwhile by another process; again")
                in_child(functools.partial(_count, cmd, where, None), WORKLOAD_TIMEOUT + 30,
                         _nothing)
            drops = dropped()
            try:
                out = in_child(functools.partial(_count, cmd, where, pid), WORKLOAD_TIMEOUT + 30,
                               functools.partial(fuse_abort, m.view) if m.fuse else _nothing)
            except Exception as e:
                result[f"{step}_error"] = str(e)
                log(f"  {step}: FAILED: {e}")
                return
            out["disturbed"] = dropped() - drops
            if not out["disturbed"]:
                break
        result[step] = out
        snap(step)
        log(f"  {step:16} {out['seconds']:8.2f} s  {out['lines']:,} lines, {out['errors']} "
            f"errors" + (f"  daemon cpu {out['cpu']:.2f} s, RSS "
                         f"{result[step + '_rss'] / 2**20:.1f} MiB, {result[step + '_fds']} "
                         f"descriptors" if pid is not None else "")
            + ("  (the caches were dropped during it)" if out["disturbed"] else ""))

    walk = ["find", "many", "-type", "f", "-printf", "%s\n"]
    snap("mounted")
    drop_caches(3)
    settle(pid)
    before_cold = dropped()
    timed("walk_cold", walk, m.view)
    timed("walk_warm", walk, m.view, warm_since=before_cold)
    drop_caches(2)
    settle(pid, 60)
    snap("forgotten")
    timed("walk_forgotten", walk, m.view)
    drop_caches(3)
    settle(pid, 60)
    timed("ls_f", ["ls", "-f", "huge"], m.view)
    drop_caches(3)
    settle(pid, 60)
    timed("ls_l", ["ls", "-l", "huge"], m.view)
    if pid is not None and "walk_cold" in result:
        inodes = result["walk_cold"]["lines"] + result["dirs"] + 1
        result["rss_per_inode"] = (result["walk_cold_rss"] - result["mounted_rss"]) / inodes
    return result


def _nothing() -> None:
    pass


def dropped() -> int:
    """How many times the kernel's caches were dropped since boot (``drop_pagecache`` and
    ``drop_slab`` in /proc/vmstat, 0 where the kernel does not count): the machine is shared, and
    another process's ``drop_caches`` makes a warm walk cold (the page cache holds the listings
    the kernel keeps of a FUSE directory, the slab its dentries and inodes)."""
    total = 0
    with open("/proc/vmstat") as f:
        for line in f:
            if line.startswith(("drop_slab ", "drop_pagecache ")):
                total += int(line.split()[1])
    return total


def run_profile(targets: list[Target], base: Path, scratch: Path, files: int, entries: int,
                reps: int, mounted: Callable[[Target, Fixture, Path], Any]) -> dict[str, Any]:
    """The profile on every target, ``reps`` times (targets rotated as in the main runs)."""
    lower = scale_fixture(base, files, entries)
    out: dict[str, Any] = {"files": files, "entries": entries, "fd_limit": FD_LIMIT,
                           "runs": {}}
    chosen = [limited(t, FD_LIMIT) for t in targets]
    for rep in range(reps):
        order = chosen[rep % len(chosen):] + chosen[:rep % len(chosen)]
        for t in order:
            log(f"large tree {rep + 1}/{reps}: {t.name}, {files:,} files, a directory of "
                f"{entries:,}")
            try:
                got = profile(t, lower, scratch, files, entries, mounted)
            except Exception as e:
                got = {"error": str(e)}
                log(f"{t.name}: large-tree profile failed: {e}")
            out["runs"].setdefault(t.name, []).append(got)
    return out
