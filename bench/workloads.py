"""The workloads, and how one is measured: in a forked child with a time limit, timing only its
timed part, with the daemon's CPU seconds over the same span."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import MIB, TICK, Params, run
from fixture import Fixture

# --- measuring ----------------------------------------------------------------------------------


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def proc_status(pid: int, key: str) -> int:
    """A kB value of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def drop_caches(level: int = 3) -> None:
    run(["sync"], timeout=600)
    Path("/proc/sys/vm/drop_caches").write_text(f"{level}\n")


def settle(pid: int | None, limit: float = 5.0) -> None:
    """Wait until the daemon stops burning CPU (the FORGETs that a cache drop sends)."""
    if pid is None:
        return
    deadline = time.monotonic() + limit
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cpu_seconds(pid)
        if now == last:
            return
        last = now


def in_child(fn: Callable[[], Any], timeout: float, on_timeout: Callable[[], None]) -> Any:
    """Run ``fn`` in a forked child with a time limit; return what it returned (pickled)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        status = 0
        try:
            payload = pickle.dumps(("ok", fn()))
        except BaseException as e:
            payload = pickle.dumps(("error", f"{type(e).__name__}: {e}"))
            status = 1
        with os.fdopen(write_end, "wb") as out:
            out.write(payload)
        os._exit(status)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    with os.fdopen(read_end, "rb") as pipe:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([pipe], [], [], remaining)[0]:
                on_timeout()
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"workload took more than {timeout:g} s")
            chunk = pipe.read1(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.waitpid(pid, 0)
    kind, value = pickle.loads(b"".join(chunks))
    if kind != "ok":
        raise RuntimeError(value)
    return value


class RequestCount:
    """Counts the requests the kernel sends to the FUSE mount at ``view``: the tracepoint
    ``fuse:fuse_request_send`` filtered by the mount's connection, counted by ``perf stat``
    (started with counting off, switched on and off through its control FIFOs, so that only the
    span between ``start`` and ``stop`` counts). FORGETs are not requests there. Without perf or
    the tracepoint (older kernels) the count is None."""

    def __init__(self, view: Path) -> None:
        self.count: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        perf = shutil.which("perf")
        if perf is None or not Path("/sys/kernel/tracing/events/fuse/fuse_request_send").exists():
            return
        self.dir = Path(tempfile.mkdtemp(prefix="bench-perf-"))
        ctl, ack = self.dir / "ctl", self.dir / "ack"
        os.mkfifo(ctl)
        os.mkfifo(ack)
        # O_RDWR: opening a FIFO so never waits for the other end (perf may fail to start).
        self.ctl = os.open(ctl, os.O_RDWR)
        self.ack = os.open(ack, os.O_RDWR)
        connection = os.minor(os.stat(view).st_dev)  # FUSE mounts have anonymous devices
        self.proc = subprocess.Popen(
            [perf, "stat", "-a", "-x,", "-o", str(self.dir / "out"), "-e",
             "fuse:fuse_request_send", "--filter", f"connection == {connection}",
             "--control", f"fifo:{ctl},{ack}", "-D", "-1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _command(self, command: bytes) -> bool:
        os.write(self.ctl, command + b"\n")
        return bool(select.select([self.ack], [], [], 10)[0]) and os.read(self.ack, 64) != b""

    def start(self) -> None:
        if self.proc is not None and not self._command(b"enable"):
            self.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self._command(b"disable"):
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            with contextlib.suppress(OSError, ValueError):
                for line in (self.dir / "out").read_text().splitlines():
                    if "fuse:fuse_request_send" in line:
                        self.count = int(line.split(",")[0])
        self.close()

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None
        os.close(self.ctl)
        os.close(self.ack)
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass(frozen=True)
class Ctx:
    view: Path
    fx: Fixture
    params: Params
    daemon: int | None


# --- workloads: each returns the seconds of its timed part and the daemon CPU seconds in it ----


@contextlib.contextmanager
def timed(ctx: Ctx, out: dict[str, float]) -> Iterator[None]:
    counter = RequestCount(ctx.view) if ctx.daemon is not None else None
    try:
        if counter is not None:
            counter.start()
        cpu0, t0 = cpu_seconds(ctx.daemon), time.perf_counter()
        yield
        out["seconds"] = time.perf_counter() - t0
        out["cpu"] = cpu_seconds(ctx.daemon) - cpu0
        if counter is not None:
            counter.stop()
            if counter.count:
                out["requests"] = counter.count
    finally:
        if counter is not None:
            counter.close()


def twice_if_warm(warm: bool, body: Callable[[], object], ctx: Ctx) -> dict[str, float]:
    """Warm: one untimed pass first, so that whatever can be cached is."""
    if warm:
        body()
    out: dict[str, float] = {}
    with timed(ctx, out):
        body()
    return out


def seq_read(ctx: Ctx, warm: bool) -> dict[str, float]:
    def body() -> None:
        buf = bytearray(MIB)
        with open(ctx.view / "big", "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return twice_if_warm(warm, body, ctx)


def rand_read(ctx: Ctx, warm: bool) -> dict[str, float]:
    blocks = ctx.params.big_mib * MIB // 4096
    rng = random.Random(3)
    offsets = [rng.randrange(blocks) * 4096 for _ in range(ctx.params.rand_reads)]

    def body() -> None:
        fd = os.open(ctx.view / "big", os.O_RDONLY)
        try:
            for off in offsets:
                os.pread(fd, 4096, off)
        finally:
            os.close(fd)
    return twice_if_warm(warm, body, ctx)


def walk(ctx: Ctx, warm: bool, top: str = "src") -> dict[str, float]:
    def body() -> int:
        count, stack = 0, [str(ctx.view / top)]
        while stack:
            d = stack.pop()
            with os.scandir(d) as it:
                for entry in it:
                    st = os.lstat(entry.path)
                    count += 1
                    if (st.st_mode & 0o170000) == 0o040000:
                        stack.append(entry.path)
        return count
    return twice_if_warm(warm, body, ctx)


def lookup(ctx: Ctx, warm: bool) -> dict[str, float]:
    """``lstat`` of every file of ``src/`` by its path, without listing a directory: one
    LOOKUP per name (its directories' after the first), the cost of resolving a name."""
    paths = [str(ctx.view / "src" / rel) for rel in ctx.fx.src_files]

    def body() -> None:
        for path in paths:
            os.lstat(path)
    return twice_if_warm(warm, body, ctx)


def readdir(ctx: Ctx, warm: bool) -> dict[str, float]:
    def body() -> None:
        n = len(os.listdir(ctx.view / "bigdir"))
        if n != ctx.params.bigdir_entries:
            raise RuntimeError(f"bigdir lists {n} entries, not {ctx.params.bigdir_entries}")
    return twice_if_warm(warm, body, ctx)


def git_status(ctx: Ctx, warm: bool) -> dict[str, float]:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # never write the index: a read workload

    def body() -> None:
        out = run(["git", "-C", str(ctx.view / "src"), "status", "--porcelain"], timeout=300,
                  env=env, stdout=subprocess.PIPE)
        if out.stdout.strip():
            raise RuntimeError(f"git status shows changes: {out.stdout[:500]}")
    return twice_if_warm(warm, body, ctx)


def seq_write(ctx: Ctx, warm: bool) -> dict[str, float]:
    chunk = random.Random(4).randbytes(MIB)
    out: dict[str, float] = {}
    with timed(ctx, out):
        fd = os.open(ctx.view / "written.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for _ in range(ctx.params.write_mib):
                os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
    return out


def small_create(ctx: Ctx, warm: bool) -> dict[str, float]:
    rng = random.Random(5)
    data = [rng.randbytes(rng.randrange(100, 4096)) for _ in range(64)]
    top = ctx.view / "created"
    out: dict[str, float] = {}
    with timed(ctx, out):
        top.mkdir()
        for d in range(20):
            (top / f"d{d:02d}").mkdir()
        for i in range(ctx.params.small_files):
            fd = os.open(top / f"d{i % 20:02d}" / f"f{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o644)
            os.write(fd, data[i % 64])
            os.close(fd)
    return out


def small_appends(ctx: Ctx, warm: bool) -> dict[str, float]:
    """Many tiny O_APPEND writes into one new file from two processes at once (a log): every
    write is a request of its own, unless the writeback cache gathers them."""
    count = ctx.params.small_files * 10
    path = ctx.view / "appended.log"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    out: dict[str, float] = {}
    with timed(ctx, out):
        children = []
        for writer in range(2):
            pid = os.fork()
            if pid == 0:  # pragma: no cover  (the child)
                status = 1
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
                    line = (b"%d\n" % writer) * 2  # 4 bytes
                    for _ in range(count // 2):
                        os.write(fd, line)
                    os.close(fd)
                    status = 0
                finally:
                    os._exit(status)
            children.append(pid)
        for pid in children:
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise RuntimeError(f"an appending process failed (status {status})")
    if os.stat(path).st_size != count * 4:
        raise RuntimeError(f"{path}: {os.stat(path).st_size} bytes, expected {count * 4}")
    return out


def tar_x(ctx: Ctx, warm: bool) -> dict[str, float]:
    dest = ctx.view / "untarred"
    out: dict[str, float] = {}
    with timed(ctx, out):
        dest.mkdir()
        run(["tar", "-xf", str(ctx.fx.tarball), "-C", str(dest)], timeout=600)
    return out


def _picked(ctx: Ctx, start: int, count: int) -> list[Path]:
    files = ctx.fx.src_files
    step = len(files) // (2 * max(ctx.params.copyup_files, ctx.params.unlink_files))
    return [ctx.view / "src" / files[start + i * step * 2] for i in range(count)]


def _used_bytes(view: Path) -> int:
    """Space used on the filesystem that writes through ``view`` land on (every target reports
    its upper's in statfs), after a sync."""
    os.sync()
    st = os.statvfs(view)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def copyup_append(ctx: Ctx, warm: bool) -> dict[str, float]:
    paths = _picked(ctx, 0, ctx.params.copyup_files)
    out: dict[str, float] = {}
    used = _used_bytes(ctx.view)
    with timed(ctx, out):
        for p in paths:
            fd = os.open(p, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"\n")
            os.close(fd)
    out["bytes"] = _used_bytes(ctx.view) - used
    return out


def copyup_big(ctx: Ctx, warm: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    used = _used_bytes(ctx.view)
    with timed(ctx, out):
        fd = os.open(ctx.view / "big", os.O_WRONLY)
        os.pwrite(fd, ctx.fx.first_byte, 0)  # the same byte: native's private copy stays as is
        os.close(fd)
    out["bytes"] = _used_bytes(ctx.view) - used
    return out


def unlink(ctx: Ctx, warm: bool) -> dict[str, float]:
    paths = _picked(ctx, 1, ctx.params.unlink_files)
    out: dict[str, float] = {}
    with timed(ctx, out):
        for p in paths:
            os.unlink(p)
    return out


@dataclass(frozen=True)
class Workload:
    name: str
    fn: Callable[[Ctx, bool], dict[str, float]]
    warm: bool = False
    cold: bool = False  # sync and drop the page cache, dentries and inodes first
    label: str = ""
    #: Run with lower and upper on an XFS image with reflinks (bench/xfs.py), in sessions of its
    #: own after the others.
    on_xfs: bool = False


def workloads(p: Params) -> list[Workload]:
    """In the order they run on each mount: reads first, then writes, each on its own files."""
    return [
        Workload("seq_read_cold", seq_read, cold=True, label=f"sequential read {p.big_mib} MiB"),
        Workload("seq_read_warm", seq_read, warm=True, label=f"sequential read {p.big_mib} MiB"),
        Workload("rand_read_cold", rand_read, cold=True, label=f"{p.rand_reads} random 4 KiB"),
        Workload("rand_read_warm", rand_read, warm=True, label=f"{p.rand_reads} random 4 KiB"),
        Workload("walk_cold", walk, cold=True, label=f"walk + lstat {p.src_files} files"),
        Workload("walk_warm", walk, warm=True, label=f"walk + lstat {p.src_files} files"),
        Workload("lookup_cold", lookup, cold=True, label=f"lstat {p.src_files} files by name"),
        Workload("readdir_cold", readdir, cold=True, label=f"readdir {p.bigdir_entries} entries"),
        Workload("readdir_warm", readdir, warm=True, label=f"readdir {p.bigdir_entries} entries"),
        Workload("git_status_cold", git_status, cold=True, label="git status"),
        Workload("git_status_warm", git_status, warm=True, label="git status"),
        Workload("seq_write", seq_write, label=f"write {p.write_mib} MiB + fsync"),
        Workload("small_create", small_create, label=f"create+write+close {p.small_files} files"),
        Workload("small_appends", small_appends,
                 label=f"{p.small_files * 10} appends of 4 bytes, 2 processes"),
        Workload("tar_x", tar_x, label=f"tar -x {p.src_files} files"),
        Workload("copyup_append", copyup_append, cold=True,
                 label=f"copy-up: append 1 byte to {p.copyup_files} files"),
        Workload("copyup_big", copyup_big, cold=True,
                 label=f"copy-up: write 1 byte into {p.big_mib} MiB"),
        Workload("unlink", unlink, label=f"unlink {p.unlink_files} lower files"),
        Workload("copyup_append_xfs", copyup_append, cold=True, on_xfs=True,
                 label=f"copy-up: append 1 byte to {p.copyup_files} files, XFS (reflink)"),
        Workload("copyup_big_xfs", copyup_big, cold=True, on_xfs=True,
                 label=f"copy-up: write 1 byte into {p.big_mib} MiB, XFS (reflink)"),
    ]
