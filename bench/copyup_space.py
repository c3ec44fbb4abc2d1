"""Copy-up cost in time and in upper space: what a small change to large lower files costs.

Two rows, on every target, each on a fresh mount with an empty upper:

* ``write 4 KiB``: open a 2 GiB lower file for writing, write 4 KiB into its middle, close;
* ``chmod -R``: ``chmod -R`` of a tree of large lower files.

For each: the seconds of the change (page cache dropped first), and the bytes the upper gained
(``st_blocks`` of everything under the upper and work directories, after ``sync``). Native is a
private copy of the lower tree changed in place (it gains nothing). The kernel's overlayfs and
fuse-overlayfs copy whole files on the first change; the kernel with ``metacopy=on`` and cowfs
with ``-o metacopy`` do not for ``chmod``; cowfs by default copies only the 64 KiB block a 4 KiB
write touches (``-o partial_copyup``, 64 MiB and larger files), and with ``-o nopartial_copyup``
the whole file.

Usage (root): ``python bench/copyup_space.py [--big-mib 2048] [--files 8 --file-mib 128]
[--dir DIR]``; prints a Markdown table. ``make bench`` runs it after the main benchmark.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MIB = 1 << 20
WRITE = 4096


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, timeout=1200)


def drop_caches() -> None:
    run(["sync"])
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def used_bytes(*roots: Path) -> int:
    total = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def fill(path: Path, mib: int, seed: int) -> None:
    block = bytes((i * 7 + seed) & 0xFF for i in range(MIB))
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "big") + block[8:])


def make_lower(lower: Path, big_mib: int, files: int, file_mib: int) -> None:
    lower.mkdir()
    fill(lower / "big", big_mib, 1)
    (lower / "tree").mkdir()
    for i in range(files):
        fill(lower / "tree" / f"part-{i:03d}", file_mib, i)


class Target:
    """Mounts a view of ``lower`` under ``session``; ``spaces`` are where its upper data goes."""

    def __init__(self, name: str, mount: Callable[[Path, Path], tuple[Path, list[Path],
                                                                       Callable[[], None]]]):
        self.name = name
        self.mount = mount


def native(lower: Path, session: Path) -> tuple[Path, list[Path], Callable[[], None]]:
    view = session / "native"
    run(["cp", "-a", str(lower), str(view)])
    return view, [], lambda: None


def kernel(options: str) -> Callable[[Path, Path], tuple[Path, list[Path], Callable[[], None]]]:
    def mount(lower: Path, session: Path) -> tuple[Path, list[Path], Callable[[], None]]:
        upper, work, mnt = (session / n for n in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            d.mkdir()
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}" + options
        run(["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)])
        return mnt, [upper, work], lambda: run(["umount", str(mnt)])

    return mount


def fuse(command: Callable[[Path, Path, Path, Path], list[str]],
         stop: Callable[[Path], list[str]] | None = None
         ) -> Callable[[Path, Path], tuple[Path, list[Path], Callable[[], None]]]:
    def mount(lower: Path, session: Path) -> tuple[Path, list[Path], Callable[[], None]]:
        upper, work, mnt = (session / n for n in ("upper", "work", "mnt"))
        for d in (upper, work, mnt):
            d.mkdir()
        log = open(session / "daemon.log", "wb")  # noqa: SIM115 (outlives this call)
        proc = subprocess.Popen(command(lower, upper, work, mnt), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((session / "daemon.log").read_text()[-2000:])
            time.sleep(0.05)

        def unmount() -> None:
            run(stop(mnt) if stop is not None else ["umount", str(mnt)])
            proc.wait(timeout=120)

        return mnt, [upper, work], unmount

    return mount


def targets(cowfs: str) -> list[Target]:
    def cowfs_cmd(options: str) -> Callable[[Path, Path, Path, Path], list[str]]:
        def cmd(lower: Path, upper: Path, work: Path, mnt: Path) -> list[str]:
            return [cowfs, "mount", "-f", "--work", str(work), *(
                ["-o", options] if options else []), str(lower), str(upper), str(mnt)]
        return cmd

    found = [Target("native", native), Target("overlayfs", kernel("")),
             Target("overlayfs metacopy=on", kernel(",metacopy=on,redirect_dir=on"))]
    if shutil.which("fuse-overlayfs"):
        found.append(Target("fuse-overlayfs", fuse(lambda lo, up, wo, mnt: [
            "fuse-overlayfs", "-f", "-o", f"lowerdir={lo},upperdir={up},workdir={wo}",
            str(mnt)])))
    stop = lambda mnt: [cowfs, "umount", str(mnt)]  # noqa: E731
    found.append(Target("cowfs", fuse(cowfs_cmd(""), stop)))
    found.append(Target("cowfs -o metacopy", fuse(cowfs_cmd("metacopy"), stop)))
    found.append(Target("cowfs -o nopartial_copyup", fuse(cowfs_cmd("nopartial_copyup"), stop)))
    return found


def write_middle(view: Path) -> None:
    size = os.stat(view / "big").st_size
    fd = os.open(view / "big", os.O_WRONLY)
    try:
        os.pwrite(fd, b"w" * WRITE, size // 2)
    finally:
        os.close(fd)


def chmod_tree(view: Path) -> None:
    run(["chmod", "-R", "go-r", str(view / "tree")])


ROWS: list[tuple[str, Callable[[Path], None]]] = [
    ("write 4 KiB into the middle of {big} MiB", write_middle),
    ("chmod -R of {files} files of {file} MiB", chmod_tree),
]


def measure(target: Target, lower: Path, base: Path, row: Callable[[Path], None]
            ) -> tuple[float, int]:
    session = Path(tempfile.mkdtemp(prefix=target.name.replace(" ", "_") + "-", dir=base))
    try:
        view, spaces, unmount = target.mount(lower, session)
        try:
            drop_caches()
            before = used_bytes(*spaces)
            t0 = time.perf_counter()
            row(view)
            seconds = time.perf_counter() - t0
            run(["sync"])
            added = used_bytes(*spaces) - before
        finally:
            unmount()
        return seconds, added
    finally:
        shutil.rmtree(session, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-mib", type=int, default=2048)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--file-mib", type=int, default=128)
    parser.add_argument("--dir", type=Path, default=None, help="where to build (default: /var/tmp)")
    parser.add_argument("--cowfs", default=shutil.which("cowfs") or "cowfs")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("copyup_space: needs root (mounts, drop_caches)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="cowfs-copyup-space-", dir=args.dir or "/var/tmp"))
    try:
        lower = base / "lower"
        make_lower(lower, args.big_mib, args.files, args.file_mib)
        names = {"big": args.big_mib, "files": args.files, "file": args.file_mib}
        print("| row | target | seconds | bytes added to the upper |")
        print("| --- | --- | ---: | ---: |")
        for label, row in ROWS:
            for target in targets(args.cowfs):
                seconds, added = measure(target, lower, base, row)
                print(f"| {label.format(**names)} | {target.name} | {seconds:.3f} | "
                      f"{added:,} |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
