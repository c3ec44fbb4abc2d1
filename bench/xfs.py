"""The copy-up rows again with lower and upper on an XFS filesystem with reflinks (issue 11).

On XFS (``mkfs.xfs -m reflink=1``) a copy-up can clone the lower file instead of copying its data,
when lower and upper are on the same filesystem: so the lower tree the copy-up workloads touch
(``big`` and ``src/``) is copied once into a loop image, and each session's upper, work directory
and mount point go there too. The image is unmounted, its loop device detached and the file
removed at the end, whatever happens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from common import MIB, log, run
from fixture import Fixture


def available() -> str | None:
    if shutil.which("mkfs.xfs") is None:
        return "mkfs.xfs is not installed (Debian package xfsprogs)"
    with open("/proc/filesystems") as f:
        return None if "\txfs\n" in f.read() else "no xfs in this kernel"


@contextlib.contextmanager
def xfs_fixture(fx: Fixture, scratch: Path, big_mib: int) -> Iterator[tuple[Fixture, Path]]:
    """A copy of the fixture's ``big`` and ``src/`` on a fresh XFS (reflink=1) loop image, and a
    scratch directory on it for the sessions."""
    image = scratch / "xfs.img"
    mnt = scratch / "xfs"
    mnt.mkdir()
    with open(image, "wb") as f:  # sparse: room for the lower, its native copy and the uppers
        f.truncate((4 * big_mib + 2048) * MIB)
    run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], timeout=120)
    dev = run(["losetup", "--find", "--show", str(image)], timeout=60,
              stdout=subprocess.PIPE).stdout.strip()
    mounted = False
    try:
        run(["mount", "-t", "xfs", dev, str(mnt)], timeout=60)
        mounted = True
        lower = mnt / "lower"
        lower.mkdir()
        log(f"copying the copy-up fixture into XFS at {mnt}")
        run(["cp", "-a", "--reflink=never", str(fx.lower / "big"), str(fx.lower / "src"),
             str(lower)], timeout=900)
        (lower / "bigdir").mkdir()  # the native target links it; the copy-up rows do not use it
        run(["cp", "--reflink=never", str(fx.native_big), str(mnt / "native-big")], timeout=900)
        (mnt / "scratch").mkdir()
        run(["sync"], timeout=600)
        yield dataclasses.replace(fx, root=mnt, lower=lower, native_big=mnt / "native-big"), \
            mnt / "scratch"
    finally:
        if mounted and subprocess.run(["umount", str(mnt)], check=False,
                                      capture_output=True).returncode != 0:
            log(f"{mnt} is busy; unmounting lazily")
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
        image.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.rmdir(mnt)
