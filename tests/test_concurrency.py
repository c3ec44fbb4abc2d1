"""Several processes at once on one cowfs mount: random writes, truncates, reads and mmap writes,
each checked against an in-memory model of the file's expected contents; files start in the
lower layer and are copied up while other processes read them. No corruption, no errors, the
daemon answers afterwards and exits cleanly, and its memory does not grow with the work done.

Each worker owns one file (any operation) and one stripe of a shared file (writes only inside
it); every worker reads the large lower file, whose tail one worker rewrites (its copy-up runs
while the others read). The model is exact because no two workers write the same bytes."""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
import random
import re
import traceback
from pathlib import Path
from typing import Any

import pytest
from conftest import LayerFactory, MountFactory
from support import File

pytestmark = pytest.mark.slow

WORKERS = 4
OPS = 600
ROUNDS = 3
STRIPE = 64 * 1024
BIG = 8 * 1024 * 1024
TAIL = 64 * 1024  # the part of the big file that worker 0 rewrites
#: How much the daemon's resident memory may grow between the first and the last round.
RSS_SLACK = 24 * 1024 * 1024


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


OWN = {i: pattern(100 + i, 48 * 1024 + i * 1000) for i in range(WORKERS)}
SHARED = pattern(7, STRIPE * WORKERS)
BIG_DATA = pattern(8, BIG)
LOWER = {
    **{f"own{i}": File(data) for i, data in OWN.items()},
    "shared": File(SHARED),
    "big": File(BIG_DATA),
}


def _pwrite_model(model: bytearray, offset: int, data: bytes) -> None:
    if offset > len(model):
        model.extend(bytes(offset - len(model)))
    model[offset : offset + len(data)] = data


def _mmap_write(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, os.fstat(fd).st_size) as m:
            m[offset : offset + len(data)] = data
            m.flush()
    finally:
        os.close(fd)


def _pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


class Worker:
    def __init__(self, mnt: Path, wid: int, seed: int, own: bytes, stripe: bytes) -> None:
        self.mnt = mnt
        self.wid = wid
        self.rng = random.Random(seed)
        self.own_path = mnt / f"own{wid}"
        self.own = bytearray(own)
        self.stripe = bytearray(stripe)
        self.tail: bytes | None = None

    def run(self, ops: int) -> None:
        actions = [
            self.write_own, self.write_own, self.truncate_own, self.read_own, self.mmap_own,
            self.write_stripe, self.mmap_stripe, self.read_stripe, self.read_big, self.read_big,
        ]  # fmt: skip
        if self.wid == 0:
            self.write_tail()  # copies the big file up while the others read it
        for _ in range(ops):
            self.rng.choice(actions)()
        self.read_own()
        self.read_stripe()

    def _data(self, most: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(1, most))

    def write_own(self) -> None:
        offset, data = self.rng.randint(0, len(self.own) + 1000), self._data(6000)
        _pwrite(self.own_path, offset, data)
        _pwrite_model(self.own, offset, data)

    def truncate_own(self) -> None:
        size = self.rng.randint(0, 2 * len(self.own) + 10)
        os.truncate(self.own_path, size)
        del self.own[size:]
        self.own.extend(bytes(size - len(self.own)))

    def mmap_own(self) -> None:
        if not self.own:
            return
        offset = self.rng.randrange(len(self.own))
        data = self._data(min(3000, len(self.own) - offset))
        _mmap_write(self.own_path, offset, data)
        _pwrite_model(self.own, offset, data)

    def read_own(self) -> None:
        got = _pread(self.own_path, 0, len(self.own) + 4096)
        assert got == bytes(self.own), f"own{self.wid}: content differs from the model"

    def _stripe_range(self) -> tuple[int, bytes]:
        offset = self.rng.randrange(STRIPE)
        return offset, self._data(min(4000, STRIPE - offset))

    def write_stripe(self) -> None:
        offset, data = self._stripe_range()
        _pwrite(self.mnt / "shared", self.wid * STRIPE + offset, data)
        _pwrite_model(self.stripe, offset, data)

    def mmap_stripe(self) -> None:
        offset, data = self._stripe_range()
        _mmap_write(self.mnt / "shared", self.wid * STRIPE + offset, data)
        _pwrite_model(self.stripe, offset, data)

    def read_stripe(self) -> None:
        got = _pread(self.mnt / "shared", self.wid * STRIPE, STRIPE)
        assert got == bytes(self.stripe), f"shared stripe {self.wid}: differs from the model"

    def read_big(self) -> None:
        offset = self.rng.randrange(BIG - TAIL)
        size = min(self.rng.choice([4096, 65536, 1 << 20]), BIG - TAIL - offset)
        got = _pread(self.mnt / "big", offset, size)
        assert got == BIG_DATA[offset : offset + size], f"big file at {offset}+{size} differs"

    def write_tail(self) -> None:
        self.tail = self.rng.randbytes(TAIL)
        _pwrite(self.mnt / "big", BIG - TAIL, self.tail)


def _work(mnt: Path, wid: int, seed: int, own: bytes, stripe: bytes, start: Any, out: Any) -> None:
    worker = Worker(mnt, wid, seed, own, stripe)
    try:
        start.wait(timeout=60)
        worker.run(OPS)
        out.put((wid, None, bytes(worker.own), bytes(worker.stripe), worker.tail))
    except BaseException:
        out.put((wid, traceback.format_exc(), b"", b"", None))


def run_round(mnt: Path, seed: int, owns: dict[int, bytes], stripes: dict[int, bytes]) -> Any:
    """One round of WORKERS processes; returns the new models (own files, stripes, big tail)."""
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [
        ctx.Process(target=_work, args=(mnt, w, seed * 100 + w, owns[w], stripes[w], start, out))
        for w in range(WORKERS)
    ]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
                p.join()
    errors = [f"worker {wid}:\n{err}" for wid, err, *_ in results if err]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    tails = [tail for *_, tail in results if tail is not None]
    return (
        {wid: own for wid, _, own, _, _ in results},
        {wid: stripe for wid, _, _, stripe, _ in results},
        tails[-1] if tails else None,
    )


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match, f"no VmRSS for {pid}"
    return int(match.group(1)) * 1024


@pytest.mark.timeout(600)
def test_concurrent_writers_and_readers_against_a_model(
    layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    mount = mount_cowfs(layers(LOWER))
    assert mount.proc is not None
    daemon = mount.proc.pid
    mnt = mount.mnt
    owns, stripes = dict(OWN), {w: SHARED[w * STRIPE : (w + 1) * STRIPE] for w in range(WORKERS)}
    tail = BIG_DATA[BIG - TAIL :]
    rss = []
    for r in range(ROUNDS):
        owns, stripes, new_tail = run_round(mnt, r + 1, owns, stripes)
        tail = new_tail or tail
        rss.append(rss_bytes(daemon))
        # After each round, everything is what the model says, read by this process.
        for w in range(WORKERS):
            assert (mnt / f"own{w}").read_bytes() == owns[w], f"own{w} after round {r}"
        assert (mnt / "shared").read_bytes() == b"".join(stripes[w] for w in range(WORKERS))
        big = (mnt / "big").read_bytes()
        assert (
            hashlib.sha256(big).digest() == hashlib.sha256(BIG_DATA[: BIG - TAIL] + tail).digest()
        )
    assert rss[-1] - rss[0] < RSS_SLACK, f"daemon RSS per round: {rss}"
    # The daemon still answers, and everything survives a remount (the teardown checks a clean
    # exit without a traceback and unchanged lowers).
    assert sorted(os.listdir(mnt)) == sorted(LOWER)
    mount.remount()
    for w in range(WORKERS):
        assert (mnt / f"own{w}").read_bytes() == owns[w]
    assert (mnt / "big").read_bytes()[BIG - TAIL :] == tail
