"""A minimal pyfuse3 filesystem for tests/test_pyfuse3_patch.py: one directory ``d`` holding
``N`` empty files, whose handlers count the requests they get. It tests pyfuse3 itself (with
patches/pyfuse3/), not cowfs.

    python pyfuse3_probe_fs.py MOUNTPOINT MODE COUNTS_FILE N

MODE: ``handle`` (opendir returns a bare handle), ``fileinfo`` (a FileInfo with cache_readdir),
``enosys`` (opendir raises ENOSYS, readdir finds its directory in ``token.inode``), each with
``+auto`` for ``enable_readdirplus_auto``. On SIGUSR1 the counts are written to COUNTS_FILE as
``name count`` lines (``readdir-plain`` and ``readdir-plus`` apart).
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Mapping

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE
DIR = ROOT + 1
FIRST_FILE = ROOT + 2


class ProbeFS(pyfuse3.Operations):
    def __init__(self, mode: str, n: int) -> None:
        super().__init__()
        self.mode, _, auto = mode.partition("+")
        self.enable_readdirplus_auto = auto == "auto"
        self.n = n
        self.counts: collections.Counter[str] = collections.Counter()

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.InodeT(inode)
        entry.st_mode = pyfuse3.ModeT((stat.S_IFDIR | 0o755) if inode in (ROOT, DIR)
                                      else (stat.S_IFREG | 0o644))
        entry.st_nlink = 1
        entry.entry_timeout = 3600
        entry.attr_timeout = 3600
        return entry

    def _names(self, inode: int) -> list[tuple[bytes, int]]:
        if inode == ROOT:
            return [(b"d", DIR)]
        return [(b"f%05d" % i, FIRST_FILE + i) for i in range(self.n)]

    async def lookup(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        self.counts["lookup"] += 1
        for n, inode in self._names(parent_inode):
            if n == name:
                return self._attr(inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode, ctx):  # type: ignore[no-untyped-def]
        self.counts["getattr"] += 1
        return self._attr(inode)

    async def opendir(self, inode, ctx):  # type: ignore[no-untyped-def]
        self.counts["opendir"] += 1
        if self.mode == "enosys":
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if self.mode == "fileinfo":
            return pyfuse3.FileInfo(fh=inode, cache_readdir=True, keep_cache=True)
        return inode

    async def readdir(self, fh, start_id, token):  # type: ignore[no-untyped-def]
        plus = token.plus
        self.counts["readdir-plus" if plus else "readdir-plain"] += 1
        inode = token.inode if fh == 0 else fh
        if self.mode == "enosys" and inode == 0:
            raise pyfuse3.FUSEError(errno.EIO)
        for index, (name, child) in enumerate(self._names(inode)[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(child), index + 1):
                return
            if plus:
                self.counts["plus-entries"] += 1

    async def releasedir(self, fh):  # type: ignore[no-untyped-def]
        self.counts["releasedir"] += 1

    async def forget(self, inode_list):  # type: ignore[no-untyped-def]
        pass


def serve(fs: pyfuse3.Operations, mnt: str, fsname: str, counts_file: str,
          counts: Callable[[], Mapping[str, int]],
          run: Callable[[], Awaitable[None]] = pyfuse3.main) -> None:
    """Mount ``fs`` and run ``run`` until unmounted; on SIGUSR1 write ``counts()`` to
    ``counts_file`` as ``name count`` lines (shared with tests/pyfuse3_loop_fs.py)."""

    def dump(*_: object) -> None:
        with open(counts_file + ".tmp", "w") as f:
            for key, value in sorted(counts().items()):
                f.write(f"{key} {value}\n")
        os.replace(counts_file + ".tmp", counts_file)

    signal.signal(signal.SIGUSR1, dump)
    options = set(pyfuse3.default_options)
    options.add(f"fsname={fsname}")
    pyfuse3.init(fs, mnt, options)
    try:
        trio.run(run)
    finally:
        pyfuse3.close(unmount=True)


def main() -> None:
    mnt, mode, counts_file, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    fs = ProbeFS(mode, n)
    serve(fs, mnt, "pyfuse3-probe", counts_file, lambda: fs.counts)


if __name__ == "__main__":
    main()
