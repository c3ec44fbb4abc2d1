#!/usr/bin/env python3
"""cowfs against native, the kernel's overlayfs, fuse-overlayfs and unionfs-fuse, side by side.

Run as root (``make bench``, ``make bench-full``, or ``python bench/run.py --help``). For each
repetition and each target, in an order rotated every repetition, it mounts the target fresh over
one cached lower fixture with an empty upper, runs every workload in one fixed order, and unmounts.
Then the large-tree profile (bench/scale.py: walks of 100,000 or 1,000,000 files and listings of
a directory of 300,000, every FUSE daemon limited to 1,024 descriptors). It prints markdown tables
of medians and ratios and writes them, with every sample, to ``bench/results/``.
docs/performance.md explains the method and how to read the tables.

Independent of the cowfs package on purpose: it drives ``cowfs mount`` like any user would.

Known limits:
- Numbers are wall-clock on a shared machine: compare ratios from the same run, never absolute
  times across runs.
- Every workload runs in a forked child with a time limit; a hung FUSE daemon is aborted through
  /sys/fs/fuse/connections, and every mount is unmounted in ``finally`` (lazily as a last resort).
"""


from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import scale
import xfs
from common import HERE, MODES, WORKLOAD_TIMEOUT, Params, log, run
from fixture import Fixture, fixture
from report import Samples, machine, median, report
from targets import (
    Cowfs,
    FuseOverlayfs,
    KernelOverlay,
    Mounted,
    Native,
    Target,
    Unionfs,
    fuse_abort,
    mounts_under,
)
from workloads import (
    Ctx,
    Workload,
    drop_caches,
    in_child,
    proc_status,
    settle,
    workloads,
)

# --- one session: mount, every workload, unmount ---------------------------------------------


@contextlib.contextmanager
def mounted(target: Target, fx: Fixture, scratch: Path) -> Iterator[Mounted]:
    session = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=scratch))
    m: Mounted | None = None
    try:
        m = target.mount(fx, session)
        yield m
    finally:
        try:
            if m is not None:
                target.unmount(m)
        finally:
            left = mounts_under(session)
            for point in left:  # last resort: never leave a mount behind
                log(f"still mounted: {point}; unmounting lazily")
                subprocess.run(["umount", "-l", point], timeout=60, check=False)
            if mounts_under(session):
                log(f"not removing {session}: something is still mounted in it")
            else:
                shutil.rmtree(session, ignore_errors=True)


def abort_if_fuse(m: Mounted) -> None:
    if m.fuse:
        fuse_abort(m.view)


def session(target: Target, fx: Fixture, params: Params, scratch: Path, samples: Samples,
            selected: list[Workload], profile: Path | None, rep: int) -> None:
    with mounted(target, fx, scratch) as m:
        ctx = Ctx(m.view, fx, params, m.pid)
        for w in selected:
            if w.cold:
                drop_caches()
                settle(m.pid)
            else:
                run(["sync"], timeout=600)
            spy = start_profile(profile, target, m, w, rep)
            try:
                result = in_child(functools.partial(w.fn, ctx, w.warm), WORKLOAD_TIMEOUT,
                                  functools.partial(abort_if_fuse, m))
            except Exception as e:
                samples.errors.append(f"{target.name} {w.name}: {e}")
                log(f"{target.name} {w.name}: FAILED: {e}")
                continue
            finally:
                stop_profile(spy)
            samples.add(w.name, target.name, result)
            space = f"  upper +{result['bytes'] / 2**20:.1f} MiB" if "bytes" in result else ""
            per_request = (f"  {result['cpu'] / result['requests'] * 1e6:5.1f} µs/request"
                           if result.get("requests") else "")
            log(f"  {target.name:15} {w.name:16} {result['seconds']:8.3f} s"
                f"  daemon cpu {result['cpu']:6.2f} s{per_request}{space}")
        if m.pid is not None:
            samples.peak_rss.setdefault(target.name, []).append(proc_status(m.pid, "VmHWM"))


def start_profile(profile: Path | None, target: Target, m: Mounted, w: Workload,
                  rep: int) -> subprocess.Popen[bytes] | None:
    """With --profile, py-spy records the cowfs daemon during each workload (collapsed stacks)."""
    if profile is None or not isinstance(target, Cowfs) or m.pid is None:
        return None
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if spy is None:
        raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
    profile.mkdir(parents=True, exist_ok=True)
    out = profile / f"{w.name}.{rep}.txt"
    proc = subprocess.Popen([spy, "record", "--pid", str(m.pid), "--rate", "250", "--format",
                             "raw", "--threads", "--native", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # let it attach
    return proc


def stop_profile(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=MODES, default=os.environ.get("BENCH_MODE", "quick"))
    p.add_argument("--reps", type=int, help="repetitions (default: the mode's)")
    p.add_argument("--targets", help="comma-separated subset of: native,overlayfs,"
                   "fuse-overlayfs,cowfs,unionfs-fuse, and, only when named, cowfs-stock (cowfs "
                   "on pyfuse3's own request loop: an A/B of patches/pyfuse3/0003) and "
                   "cowfs-inline-epoll (the inline loop waiting in trio's epoll: an A/B of 0006) "
                   "and cowfs-nospin (0006's wait without its checks before sleeping)")
    p.add_argument("--workloads", help="comma-separated subset of the workload names")
    p.add_argument("--no-scale", "--no-memory", dest="no_scale", action="store_true",
                   help="skip the large-tree profile (bench/scale.py)")
    p.add_argument("--scale-only", action="store_true",
                   help="only the large-tree profile: no repetitions of the workloads")
    p.add_argument("--scale-reps", type=int, default=1,
                   help="repetitions of the large-tree profile (default: %(default)s)")
    p.add_argument("--scale-files", type=int, help="files of the large tree (default: the "
                   "mode's: quick 100,000, full 1,000,000)")
    p.add_argument("--cowfs", default=str(Path(sys.executable).parent / "cowfs"),
                   help="the cowfs command (default: the one beside this Python)")
    p.add_argument("--cowfs-options", default="", help="-o options for cowfs mount")
    p.add_argument("--cowfs-source", action="append", default=[], metavar="NAME=DIR",
                   help="another target, cowfs-NAME: the same cowfs command importing the cowfs "
                   "package in DIR (e.g. a 'git archive' of another commit), for an A/B of two "
                   "versions; repeatable, and selected whether or not --targets names it")
    p.add_argument("--fixture-dir", type=Path, default=Path("/var/tmp/cowfs-bench"),
                   help="where the lower fixture is built once and cached")
    p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()),
                   help="where uppers and mountpoints go (default: %(default)s); a tmpfs here "
                   "keeps other disk traffic out of the write workloads")
    p.add_argument("--out", type=Path, default=HERE / "results",
                   help="where latest.json and latest.md go (with --scale-only: large-tree.json "
                   "and large-tree.md, beside the last full run's)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="record the cowfs daemon with py-spy during each workload (slows it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (mount -t overlay, drop_caches)", file=sys.stderr)
        return 2
    params = MODES[args.mode]
    if args.reps is not None:
        params = dataclasses.replace(params, reps=args.reps)
    every: list[Target] = [Native(), KernelOverlay(), FuseOverlayfs(),
                           Cowfs(args.cowfs, args.cowfs_options), Unionfs(),
                           Cowfs(args.cowfs, args.cowfs_options, loop="stock"),
                           Cowfs(args.cowfs, args.cowfs_options, loop="inline-epoll"),
                           Cowfs(args.cowfs, args.cowfs_options, loop="nospin")]
    for spec in args.cowfs_source:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not Path(directory, "cowfs", "__init__.py").is_file():
            print(f"bench: --cowfs-source {spec!r}: give NAME=DIR, DIR holding a cowfs package",
                  file=sys.stderr)
            return 2
        every.append(Cowfs(args.cowfs, args.cowfs_options,
                           source=(name, str(Path(directory).resolve()))))
    wanted = (set(args.targets.split(",")) if args.targets
              else {t.name for t in every} - {"cowfs-stock", "cowfs-inline-epoll", "cowfs-nospin"})
    wanted |= {f"cowfs-{spec.partition('=')[0]}" for spec in args.cowfs_source}
    targets = []
    for t in every:
        why = t.available() if t.name in wanted else "not selected"
        if why is None:
            targets.append(t)
        elif t.name in wanted:
            log(f"skipping {t.name}: {why}")
    wls = workloads(params)
    if args.workloads:
        chosen = set(args.workloads.split(","))
        wls = [w for w in wls if w.name in chosen]
    if args.scale_files is not None:
        params = dataclasses.replace(params, many_files=args.scale_files)
    fx = fixture(args.fixture_dir, params) if not args.scale_only else None
    meta = {"mode": args.mode, "reps": params.reps, "params": dataclasses.asdict(params),
            "many_files": params.many_files, "huge_entries": params.huge_entries,
            "cowfs_options": args.cowfs_options, **machine()}
    samples = Samples()
    large: dict[str, Any] = {}
    scratch = Path(tempfile.mkdtemp(prefix="cowfs-bench-", dir=args.scratch))
    started = time.monotonic()
    try:
        for rep in range(params.reps if fx is not None else 0):
            order = targets[rep % len(targets):] + targets[:rep % len(targets)]
            log(f"repetition {rep + 1}/{params.reps}: {', '.join(t.name for t in order)}")
            for t in order:
                try:
                    session(t, fx, params, scratch, samples, [w for w in wls if not w.on_xfs],
                            args.profile, rep)
                except Exception as e:
                    samples.errors.append(f"{t.name} session {rep + 1}: {e}")
                    log(f"{t.name}: session failed: {e}")
        on_xfs = [w for w in wls if w.on_xfs] if fx is not None else []
        why = xfs.available() if on_xfs else None
        if why is not None:
            log(f"skipping the XFS rows: {why}")
        elif on_xfs and fx is not None:
            with xfs.xfs_fixture(fx, scratch, params.big_mib) as (xfx, xscratch):
                for rep in range(params.reps):
                    order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                    log(f"XFS repetition {rep + 1}/{params.reps}")
                    for t in order:
                        try:
                            session(t, xfx, params, xscratch, samples, on_xfs, args.profile, rep)
                        except Exception as e:
                            samples.errors.append(f"{t.name} XFS session {rep + 1}: {e}")
                            log(f"{t.name}: XFS session failed: {e}")
        if not args.no_scale:
            large = scale.run_profile(targets, args.fixture_dir, scratch, params.many_files,
                                      params.huge_entries, args.scale_reps, mounted)
    finally:
        if mounts_under(scratch):
            log(f"leaving {scratch}: something is still mounted in it")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - started)
    names = [t.name for t in targets]
    if fx is None:
        meta["reps"] = args.scale_reps
    text = report(samples, names, wls if fx is not None else [], large, meta)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "large-tree" if args.scale_only else "latest"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "targets": names, "workloads": {w.name: w.label for w in wls},
         "seconds": samples.seconds, "daemon_cpu": samples.cpu, "requests": samples.requests,
         "peak_rss": samples.peak_rss,
         "large_tree": large, "errors": samples.errors,
         "median_seconds": {w: {t: median(v) for t, v in row.items()}
                            for w, row in samples.seconds.items()}}, indent=1))
    log(f"done in {meta['seconds']} s; wrote {args.out / stem}.json and {stem}.md")
    return 1 if samples.errors else 0


if __name__ == "__main__":
    sys.exit(main())
