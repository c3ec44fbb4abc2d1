"""Walks of a large tree with a small descriptor limit (issue 19; docs/performance.md, "Descriptors
and memory"): cowfs against fuse-overlayfs on the same layers, each daemon under ``ulimit -n``.

For each target: mount, drop the kernel's caches, walk (``find -type f -printf '%s\\n'``, cold),
walk again (warm), drop the caches, walk once more; after each step the daemon's RSS and open
descriptors.
Root only (drop_caches). Usage: ``python bench/walk_scale.py [--files N] [--limit N] [DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PER_DIR = 1000
NEWLINE = b"\n"


def make_tree(lower: Path, files: int) -> None:
    for d in range(files // PER_DIR):
        sub = lower / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(PER_DIR):
            (sub / f"f{i}").write_bytes(b"x")


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("2\n")


def walk(mnt: Path) -> tuple[float, str]:
    """How long a walk took, and what it saw (files, and the errors find reported)."""
    start = time.monotonic()
    done = subprocess.run(["find", str(mnt), "-type", "f", "-printf", "%s\n"], check=False,
                          capture_output=True)
    took = time.monotonic() - start
    seen = f"{done.stdout.count(NEWLINE)} files"
    errors = done.stderr.count(NEWLINE)
    return took, f"{seen}, {errors} errors" if errors else seen


def daemon(mnt: Path) -> int:
    """The pid of the process serving ``mnt`` (the one holding /dev/fuse, by its command line)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if os.fsencode(str(mnt)) in cmd and b"umount" not in b" ".join(cmd):
            return int(entry.name)
    raise SystemExit(f"no daemon found for {mnt}")


def usage(pid: int) -> str:
    rss = next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return f"RSS {int(rss) / 1024:.1f} MiB, {len(os.listdir(f'/proc/{pid}/fd'))} descriptors"


def measure(name: str, mount: list[str], umount: list[str], mnt: Path, limit: int) -> None:
    # As root, without CAP_SYS_RESOURCE: or cowfs would raise its own limit (as
    # tests/test_mount_limits.py does).
    drop = ["setpriv", "--bounding-set", "-sys_resource", "--"] if os.geteuid() == 0 else []
    subprocess.run([*drop, "prlimit", f"--nofile={limit}:{limit}", "--", *mount], check=True)
    try:
        for _ in range(100):
            if os.path.ismount(mnt):
                break
            time.sleep(0.1)
        pid = daemon(mnt)
        print(f"{name}: mounted, {usage(pid)}", flush=True)
        drop_caches()
        for step in ("cold", "warm"):
            took, seen = walk(mnt)
            print(f"{name}: {step} walk {took:.2f} s, {seen}; {usage(pid)}", flush=True)
        drop_caches()
        time.sleep(1)
        print(f"{name}: after drop_caches, {usage(pid)}", flush=True)
        took, seen = walk(mnt)  # memory freed by the forgets is used again, not added to
        print(f"{name}: cold walk again {took:.2f} s, {seen}; {usage(pid)}", flush=True)
    finally:
        subprocess.run(umount, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=1024)
    parser.add_argument("dir", nargs="?", default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("walk_scale: needs root (drop_caches)")
    top = Path(tempfile.mkdtemp(prefix="walk-scale-", dir=args.dir))
    try:
        lower = top / "lower"
        make_tree(lower, args.files)
        cowfs = str(Path(sys.executable).parent / "cowfs")
        for name in ("cowfs", "fuse-overlayfs"):
            upper, work, mnt = top / f"{name}-upper", top / f"{name}-work", top / f"{name}-mnt"
            for d in (upper, work, mnt):
                d.mkdir()
            if name == "cowfs":
                mount = [cowfs, "mount", str(lower), str(upper), str(mnt)]
                umount = [cowfs, "umount", str(mnt)]
            else:
                mount = ["fuse-overlayfs", "-o", f"lowerdir={lower},upperdir={upper},"
                         f"workdir={work}", str(mnt)]
                umount = ["fusermount3", "-u", str(mnt)]
            measure(name, mount, umount, mnt, args.limit)
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
