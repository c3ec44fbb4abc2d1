"""The samples of a run, and the markdown tables made of them."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any

from common import MIB, TIMES
from workloads import Workload


@dataclass
class Samples:
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # workload->target
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    #: FUSE requests the kernel sent, where they could be counted (workloads.RequestCount).
    requests: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    peak_rss: dict[str, list[int]] = field(default_factory=dict)  # target -> per session
    errors: list[str] = field(default_factory=list)

    def add(self, workload: str, target: str, result: dict[str, float]) -> None:
        self.seconds.setdefault(workload, {}).setdefault(target, []).append(result["seconds"])
        self.cpu.setdefault(workload, {}).setdefault(target, []).append(result["cpu"])
        if result.get("requests"):
            self.requests.setdefault(workload, {}).setdefault(target, []).append(
                result["requests"])

    def cpu_per_request(self, workload: str, target: str) -> float:
        """Median daemon CPU seconds per request, over the samples that counted requests."""
        cpu = self.cpu.get(workload, {}).get(target, [])
        requests = self.requests.get(workload, {}).get(target, [])
        if not requests or len(requests) != len(cpu):
            return float("nan")
        return median([c / r for c, r in zip(cpu, requests, strict=True)])


# --- reporting ----------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_ratio(x: float) -> str:
    return "—" if x != x else (f"{x:.1f}{TIMES}" if x >= 10 else f"{x:.2f}{TIMES}")


def report(samples: Samples, names: list[str], wls: list[Workload], large: dict[str, Any],
           meta: dict[str, Any]) -> str:
    lines = [f"Mode {meta['mode']}, {meta['reps']} repetitions, medians. Machine: "
             f"{meta['nproc']} cores, {meta['cpu']}, Linux {meta['kernel']}, {meta['date']}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", ""]
    if wls:
        lines += _workload_tables(samples, names, wls)
    lines += large_tree(large, names)
    if samples.errors:
        lines += ["", "Failures:", ""] + [f"- {e}" for e in samples.errors]
    return "\n".join(lines) + "\n"


def _workload_tables(samples: Samples, names: list[str], wls: list[Workload]) -> list[str]:
    lines: list[str] = []
    head = "| workload | " + " | ".join(names) + " |"
    rule = "| --- |" + " ---: |" * len(names)
    lines += ["Wall time in seconds (ratio to native):", "", head, rule]
    for w in wls:
        row = samples.seconds.get(w.name, {})
        base = median(row.get("native", []))
        cells = []
        for n in names:
            t = median(row.get(n, []))
            cells.append("—" if t != t else f"{t:.3f} ({fmt_ratio(t / base)})")
        lines.append(f"| {w.name}: {w.label} | " + " | ".join(cells) + " |")
    if "fuse-overlayfs" in names:
        others = [n for n in names if n != "fuse-overlayfs"]
        lines += ["", f"Ratio to fuse-overlayfs (below 1.00{TIMES} is faster):", "",
                  "| workload | " + " | ".join(others) + " |", "| --- |" + " ---: |" * len(others)]
        for w in wls:
            row = samples.seconds.get(w.name, {})
            ref = median(row.get("fuse-overlayfs", []))
            cells = [fmt_ratio(median(row.get(n, [])) / ref) for n in others]
            lines.append(f"| {w.name} | " + " | ".join(cells) + " |")
    daemons = [n for n in names if n in samples.peak_rss]
    if daemons:
        lines += ["", "FUSE daemon CPU seconds (user + system) per workload, and peak RSS:", "",
                  "| workload | " + " | ".join(daemons) + " |",
                  "| --- |" + " ---: |" * len(daemons)]
        for w in wls:
            row = samples.cpu.get(w.name, {})
            lines.append(f"| {w.name} | " + " | ".join(
                f"{median(row.get(n, [])):.2f}" for n in daemons) + " |")
        lines.append("| peak RSS (MiB) | " + " | ".join(
            f"{max(samples.peak_rss[n]) / MIB:.0f}" for n in daemons) + " |")
    counted = [n for n in names if any(n in row for row in samples.requests.values())]
    if counted:
        lines += ["", "Daemon CPU per request in µs (median of CPU ÷ requests the kernel sent; "
                  "requests in parentheses):", "",
                  "| workload | " + " | ".join(counted) + " |",
                  "| --- |" + " ---: |" * len(counted)]
        for w in wls:
            reqs = samples.requests.get(w.name, {})
            cells = []
            for n in counted:
                us = samples.cpu_per_request(w.name, n) * 1e6
                cells.append("—" if us != us else f"{us:.1f} ({median(reqs[n]):.0f})")
            lines.append(f"| {w.name} | " + " | ".join(cells) + " |")
    return lines


def _mib(x: float) -> str:
    return f"{x / MIB:.1f}"


def large_tree(large: dict[str, Any], names: list[str]) -> list[str]:
    """The tables of the large-tree profile (bench/scale.py): medians over its repetitions."""
    runs: dict[str, list[dict[str, Any]]] = large.get("runs", {}) if large else {}
    if not runs:
        return []
    files, entries = large["files"], large["entries"]

    def med(name: str, key: str, sub: str | None = None) -> float:
        values = [r[key][sub] if sub is not None else r[key] for r in runs.get(name, ())
                  if key in r and (sub is None or sub in r[key])]
        return median(values)

    def seconds(name: str, step: str, expected: int) -> str:
        t = med(name, step, "seconds")
        if t != t:
            return "—"
        seen = min((r[step]["lines"] for r in runs[name] if step in r), default=0)
        errors = max((r[step]["errors"] for r in runs[name] if step in r), default=0)
        missing = "" if seen >= expected and not errors else (
            f" ({seen:,} seen, {errors:,} errors)")
        disturbed = any(r[step].get("disturbed") for r in runs[name] if step in r)
        return f"{t:.2f}{missing}{' *' if disturbed else ''}"

    order = [n for n in names if n in runs]
    reps = max(len(v) for v in runs.values())
    lines = ["", f"Large tree ({reps} repetition{'s' if reps > 1 else ''}, medians): a walk "
             f"(`find -type f`) of {files:,} files in directories of 1,000, and a directory of "
             f"{entries:,} entries; every FUSE daemon limited to {large['fd_limit']:,} "
             "descriptors. Seconds; a walk or listing that missed entries says how many it saw; "
             "* marks a step during which another process dropped the kernel's caches (a warm "
             "walk is warmed again and tried three times before it is reported so):",
             "", "| target | cold walk | warm walk | walk after the kernel forgot | `ls -f` | "
             "`ls -l` |", "| --- |" + " ---: |" * 5]
    for n in order:
        lines.append(f"| {n} | " + " | ".join((
            seconds(n, "walk_cold", files), seconds(n, "walk_warm", files),
            seconds(n, "walk_forgotten", files), seconds(n, "ls_f", entries + 2),
            seconds(n, "ls_l", entries + 1))) + " |")
    refs = [("fuse-overlayfs", "walk_cold"), ("overlayfs", "walk_warm"),
            ("fuse-overlayfs", "ls_l")]
    if any(ref in order for ref, _ in refs):
        lines += ["", "The goals of issue 19, as ratios: cold walk ÷ fuse-overlayfs (at most "
                  f"1.00{TIMES}), warm walk ÷ overlayfs (at most 1.50{TIMES}), `ls -l` ÷ "
                  f"fuse-overlayfs (at most 1.00{TIMES}):", "",
                  "| target | cold walk | warm walk | `ls -l` |", "| --- | ---: | ---: | ---: |"]
        for n in order:
            if n.startswith("cowfs"):
                lines.append(f"| {n} | " + " | ".join(
                    fmt_ratio(med(n, step, "seconds") / med(ref, step, "seconds"))
                    for ref, step in refs) + " |")
    daemons = [n for n in order if any("mounted_rss" in r for r in runs[n])]
    if daemons:
        lines += ["", "Daemon RSS in MiB / open descriptors after each step, and RSS per inode "
                  "the cold walk made the kernel hold:", "",
                  "| target | mounted | cold walk | warm walk | the kernel forgot | walk again "
                  "| `ls -f` | `ls -l` | bytes per inode |", "| --- |" + " ---: |" * 8]
        for n in daemons:
            cells = []
            for step in ("mounted", "walk_cold", "walk_warm", "forgotten", "walk_forgotten",
                         "ls_f", "ls_l"):
                rss = med(n, f"{step}_rss")
                cells.append("—" if rss != rss else
                             f"{_mib(rss)} / {med(n, f'{step}_fds'):.0f}")
            per = med(n, "rss_per_inode")
            cells.append("—" if per != per else f"{per:.0f}")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    for n in order:
        for r in runs[n]:
            for key, value in r.items():
                if key == "error" or key.endswith("_error"):
                    lines.append(f"\n{n}: {key}: {value}")
    return lines


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("fuse-overlayfs", "unionfs-fuse", "fuse3", "git"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name],
                                 capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0 and out.stdout:
                versions[name] = out.stdout.strip()
    versions["python"] = platform.python_version()
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "date": datetime.date.today().isoformat(), "versions": versions}
