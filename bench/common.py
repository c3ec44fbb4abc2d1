"""What every part of the benchmark shares: sizes of each mode, logging, running commands."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURE_VERSION = 4
MIB = 1 << 20
FIXED_MTIME = 1577836800  # 2020-01-01: older than the git index, so git never re-hashes a file
WORKLOAD_TIMEOUT = 600.0
MOUNT_TIMEOUT = 30.0
TICK = os.sysconf("SC_CLK_TCK")
TIMES = "\u00d7"  # the multiplication sign of "1.5x" in the tables


@dataclass(frozen=True)
class Params:
    """Sizes of one mode. The fixture is cached per distinct set of fixture sizes."""

    big_mib: int
    src_files: int
    bigdir_entries: int
    #: The large-tree profile (bench/scale.py): files in ``many/``, entries of ``huge/``.
    many_files: int
    huge_entries: int
    reps: int
    rand_reads: int
    write_mib: int
    small_files: int
    copyup_files: int
    unlink_files: int

    def fixture_key(self) -> dict[str, int]:
        return {"version": FIXTURE_VERSION, "big_mib": self.big_mib, "src_files": self.src_files,
                "bigdir_entries": self.bigdir_entries}


MODES = {
    "quick": Params(big_mib=512, src_files=5000, bigdir_entries=10000, many_files=100_000,
                    huge_entries=300_000, reps=3, rand_reads=2000, write_mib=256,
                    small_files=2000, copyup_files=500, unlink_files=500),
    "full": Params(big_mib=2048, src_files=10000, bigdir_entries=20000, many_files=1_000_000,
                   huge_entries=300_000, reps=5, rand_reads=10000, write_mib=1024,
                   small_files=5000, copyup_files=1000, unlink_files=1000),
    # Checks that the benchmark itself works, in seconds; its numbers mean nothing.
    "smoke": Params(big_mib=16, src_files=300, bigdir_entries=500, many_files=2000,
                    huge_entries=3000, reps=1, rand_reads=100, write_mib=8, small_files=100,
                    copyup_files=20, unlink_files=20),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], timeout: float = 120.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure raises with the end of its standard error in the message."""
    kw.setdefault("stderr", subprocess.PIPE)
    done = subprocess.run(cmd, check=False, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          **kw)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}: {(done.stderr or '')[-800:]}")
    return done
