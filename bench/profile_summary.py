#!/usr/bin/env python3
"""Summarise py-spy's collapsed stacks (``run.py --profile DIR`` writes them) as two top lists.

    python bench/profile_summary.py DIR/tar_x.0.txt [--top 25] [--busy]

*Self*: samples whose innermost frame is the function (where the time goes). *Inclusive*: samples
with the function anywhere on the stack (what it costs, callees included). Each line of the input
is ``frame;frame;...;frame COUNT`` with frames like ``name (file.py:12)``; with ``--busy`` the
samples of threads waiting for work (trio's epoll, idle worker threads) are left out.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from pathlib import Path

#: Innermost frames of a thread that has nothing to do.
IDLE = re.compile(r"^(\S*\.)?(epoll_wait|get_events|_wait_fuse_readable|wait|_work|select|poll) ")


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` -> ``name (file.py)``: lines of one function add up."""
    m = re.match(r"^(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    return f"{m.group(1)} ({Path(m.group(2)).name})"


def summarise(path: Path, top: int, busy: bool) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [_function(f) for f in stack.split(";") if f]
        if busy and frames and IDLE.match(frames[-1]):
            continue
        n = int(count)
        total += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    out = [f"{path.name}: {total} samples" + (" (busy only)" if busy else "")]
    for title, counter in (("self", own), ("inclusive", incl)):
        out.append(f"-- {title}")
        for name, n in counter.most_common(top):
            out.append(f"{100 * n / max(total, 1):6.1f}%  {name}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--busy", action="store_true", help="leave out samples of idle threads")
    args = p.parse_args()
    for f in args.files:
        print(summarise(f, args.top, args.busy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
