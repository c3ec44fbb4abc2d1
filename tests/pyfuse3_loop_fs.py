"""A minimal pyfuse3 filesystem for tests/test_pyfuse3_loop.py: the request loop of
patches/pyfuse3/0003 (``pyfuse3.main(inline=True)``) against handlers that answer at once and
handlers that suspend. It tests pyfuse3 itself, not cowfs.

    python pyfuse3_loop_fs.py MOUNTPOINT LOOP COUNTS_FILE [N (ignored)]

LOOP: ``inline`` (waiting for requests in poll(2), after 100 checks without sleeping, as cowfs runs
it), ``inline-nospin`` (without the checks: ``idle_spins=0``), ``inline-epoll`` (waiting in trio's
epoll alone: ``idle_poll=False``) or ``stock`` (pyfuse3's own loop). The root directory holds
``fast0`` .. ``fast9`` (every handler answers without awaiting anything), ``sleep0`` .. ``sleep9``
(each handler first sleeps 5 ms in trio), ``thread0`` .. ``thread9`` (each handler first sleeps 5
ms in a worker thread) and ``slow`` (its read sleeps 3 s in trio). Each file's content is its name
repeated 100 times; names and attributes are not cached (timeouts 0) and reads are direct, so every
stat and read reaches the daemon.

Every handler call is counted, by handler and in total (``handled``, ``finished``); on SIGUSR1 the
counts and ``pyfuse3.request_count()`` (``requests``, ``suspended``, ``idle_waits``) are written to
COUNTS_FILE as ``name count`` lines: ``requests - handled`` counts the requests that libfuse
answers itself (INIT, INTERRUPT). SIGINT and SIGTERM end the loop through ``pyfuse3.terminate()``
and unmount, as cowfs does.
"""

from __future__ import annotations

import collections
import errno
import functools
import inspect
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio
from pyfuse3_probe_fs import serve

ROOT = pyfuse3.ROOT_INODE
NAMES = [b"slow"] + [b"%s%d" % (kind, i) for kind in (b"fast", b"sleep", b"thread")
                     for i in range(10)]
INODES = {name: ROOT + 1 + i for i, name in enumerate(NAMES)}
BY_INODE = {inode: name for name, inode in INODES.items()}
SLOW_SECONDS = 3.0


def content(name: bytes) -> bytes:
    return name * 100


class LoopFS(pyfuse3.Operations):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        for attr, value in inspect.getmembers(pyfuse3.Operations):
            if inspect.iscoroutinefunction(value):
                setattr(self, attr, self._counted(attr, getattr(self, attr)))

    def _counted(self, attr: str,
                 handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(handler)
        async def counted(*args: Any) -> Any:
            self.counts["handled"] += 1
            self.counts[attr] += 1
            try:
                return await handler(*args)
            finally:
                self.counts["finished"] += 1
        return counted

    async def _wait_as(self, inode: int) -> None:
        name = BY_INODE.get(inode, b"")
        if name.startswith(b"sleep"):
            await trio.sleep(0.005)
        elif name.startswith(b"thread"):
            await trio.to_thread.run_sync(time.sleep, 0.005)

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.InodeT(inode)
        if inode == ROOT:
            entry.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o755)
        else:
            entry.st_mode = pyfuse3.ModeT(stat.S_IFREG | 0o644)
            entry.st_size = len(content(BY_INODE[inode]))
        entry.st_nlink = 1
        entry.entry_timeout = 0
        entry.attr_timeout = 0
        return entry

    async def lookup(self, parent_inode, name, ctx):  # type: ignore[no-untyped-def]
        if parent_inode != ROOT or name not in INODES:
            raise pyfuse3.FUSEError(errno.ENOENT)
        await self._wait_as(INODES[name])
        return self._attr(INODES[name])

    async def getattr(self, inode, ctx):  # type: ignore[no-untyped-def]
        await self._wait_as(inode)
        return self._attr(inode)

    async def open(self, inode, flags, ctx):  # type: ignore[no-untyped-def]
        await self._wait_as(inode)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):  # type: ignore[no-untyped-def]
        name = BY_INODE[fh]
        if name == b"slow":
            self.counts["slow-started"] += 1
            await trio.sleep(SLOW_SECONDS)
        await self._wait_as(fh)
        return content(name)[off:off + size]

    async def release(self, fh):  # type: ignore[no-untyped-def]
        await self._wait_as(fh)

    async def forget(self, inode_list):  # type: ignore[no-untyped-def]
        pass


#: Ticks of a trio task that sleeps 50 ms at a time beside the loop (``ticks`` in the counts):
#: a loop that waited past trio's deadlines would make them fall behind while it is idle.
TICKS = [0]


async def _ticker() -> None:
    while True:
        await trio.sleep(0.05)
        TICKS[0] += 1


async def run(loop: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_ticker)

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(stop_on_signal)
        if loop == "stock":
            await pyfuse3.main()
        else:
            await pyfuse3.main(inline=True, idle_poll=loop != "inline-epoll",
                               idle_spins=100 if loop == "inline" else 0)
        nursery.cancel_scope.cancel()


def main() -> None:
    mnt, loop, counts_file = sys.argv[1], sys.argv[2], sys.argv[3]
    fs = LoopFS()

    def counts() -> dict[str, int]:
        requests, suspended, idle_waits = pyfuse3.request_count()
        return {**fs.counts, "requests": requests, "suspended": suspended,
                "idle_waits": idle_waits, "ticks": TICKS[0]}

    serve(fs, mnt, "pyfuse3-loop", counts_file, counts, functools.partial(run, loop))


if __name__ == "__main__":
    main()
