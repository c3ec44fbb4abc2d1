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


def report(samples: Samples, names: list[str], wls: list[Workload], memory: dict[str, Any],
           meta: dict[str, Any]) -> str:
    lines = [f"Mode {meta['mode']}, {meta['reps']} repetitions, medians. Machine: "
             f"{meta['nproc']} cores, {meta['cpu']}, Linux {meta['kernel']}, {meta['date']}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".", ""]
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
    if memory:
        lines += ["", f"Daemon memory around a walk of {meta['many_files']} files "
                  "(RSS MiB / open descriptors):", "",
                  "| target | before | after walk | after forget | after 2nd walk "
                  "| after 2nd forget | walk s |", "| --- |" + " ---: |" * 6]
        for n, r in memory.items():
            cells = [f"{r[k]['rss'] / MIB:.0f} / {r[k]['fds']}" if k in r else "—" for k in
                     ("before", "after_walk", "after_forget", "after_second_walk",
                      "after_second_forget")]
            walked = f"{r['walk_seconds']:.1f}" if "walk_seconds" in r else "—"
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {walked} |")
        for n, r in memory.items():
            if "error" in r:
                lines.append(f"\n{n} (descriptor limit {r.get('fd_limit', '?')}): {r['error']}")
    if samples.errors:
        lines += ["", "Failures:", ""] + [f"- {e}" for e in samples.errors]
    return "\n".join(lines) + "\n"


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
