"""The inline request loop of patches/pyfuse3/0003 (``pyfuse3.main(inline=True)``): first on a
filesystem of its own (tests/pyfuse3_loop_fs.py) whose handlers answer at once, sleep in trio or
sleep in a worker thread, then under cowfs (a large copy-up in a worker thread among small
requests, unmount and Ctrl-C under load).

What is checked: every client gets the right answer and no request hangs (each wait has a
timeout, and a watchdog aborts the FUSE connection if a request never returns); every handler
that started finished; the loop really ran handlers inline and handed suspended ones on (its
counters); FUSE_INTERRUPT, which libfuse answers without a handler, is read and the interrupted
request still answered; the daemon ends cleanly when unmounted or sent SIGINT under load.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
from conftest import LayerFactory, LayerSet, MountFactory
from support import File, mounted_fstype, start_watchdog, stop_watchdog, wait_until
from test_pyfuse3_patch import Probe

LOOP_FS = Path(__file__).with_name("pyfuse3_loop_fs.py")
sys.path.insert(0, str(LOOP_FS.parent))
from pyfuse3_loop_fs import NAMES, SLOW_SECONDS, content  # noqa: E402

pytestmark = pytest.mark.skipif(
    not hasattr(pyfuse3, "request_count"),
    reason="pyfuse3 without patches/pyfuse3/0003 (make setup builds it)")

#: Files whose handlers answer at once or suspend (not ``slow``).
MIXED = [name.decode() for name in NAMES if name != b"slow"]


class LoopFS(Probe):
    """tests/pyfuse3_loop_fs.py mounted at ``tmp/mnt`` with one of the two loops, under a
    watchdog that aborts the FUSE connection if a request hangs."""

    def __init__(self, tmp: Path, loop: str) -> None:
        super().__init__(tmp, loop, 0, script=LOOP_FS)
        self.watchdog: subprocess.Popen[bytes] | None = None

    def wait_mounted(self) -> None:
        super().wait_mounted()
        self.watchdog = start_watchdog(self.mnt, 90)

    def settled(self) -> dict[str, int]:
        """The counts once every handler that started has finished (the kernel sends RELEASE
        after close returns, so one may still be running when the clients are done)."""
        counts: dict[str, int] = {}

        def done() -> bool:
            counts.update(self.counts())
            return counts["handled"] == counts["finished"]

        assert wait_until(done, 10), counts
        return counts

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        fired = stop_watchdog(self.watchdog)
        super().stop()
        assert not fired, "a request hung: the watchdog aborted the FUSE connection"


@contextlib.contextmanager
def loop_fs(tmp_path: Path, loop: str) -> Iterator[LoopFS]:
    fs = LoopFS(tmp_path, loop)
    try:
        fs.wait_mounted()
        yield fs
    finally:
        fs.stop()


def _read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def run_clients(count: int, client: Callable[[int], None], timeout: float) -> list[str]:
    """Run ``client(i)`` in ``count`` threads; the errors they raised (a hung one is one)."""
    errors: list[str] = []

    def run(i: int) -> None:
        try:
            client(i)
        except Exception as e:  # reported by the test
            errors.append(f"client {i}: {e!r}")

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0))
    errors += [f"{t.name} still running after {timeout}s" for t in threads if t.is_alive()]
    return errors


def mixed_client(mnt: Path, ops: int) -> Callable[[int], None]:
    def client(i: int) -> None:
        rng = random.Random(i)
        for _ in range(ops):
            name = rng.choice(MIXED)
            assert (mnt / name).stat().st_size == len(content(name.encode()))
            assert _read(mnt / name) == content(name.encode()), name
    return client


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop", ["inline", "inline-nospin", "inline-epoll", "stock"])
def test_many_clients_some_handlers_suspend_every_request_answered_once(
        tmp_path: Path, loop: str) -> None:
    with loop_fs(tmp_path, loop) as fs:
        errors = run_clients(12, mixed_client(fs.mnt, 150), timeout=80)
        assert not errors, errors
        counts = fs.settled()
    # stat, open, read and release of 12 x 150 files; lookups too (names are not cached)
    assert counts["read"] >= 12 * 150, counts
    assert counts["requests"] >= 4 * 12 * 150, counts
    if loop != "stock":
        assert 0 < counts["suspended"] < counts["handled"], counts
    if loop in ("inline-epoll", "stock"):
        assert counts["idle_waits"] == 0, counts
    output = fs.output()
    for sign in ("Traceback", "py_retval was not awaited", "fuse_reply_"):
        assert sign not in output, output


@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop", ["inline", "inline-nospin", "inline-epoll"])
def test_one_client_at_a_time_idle_waits_wake_for_threads_timers_and_signals(
        tmp_path: Path, loop: str) -> None:
    """One client, one request at a time: the queue is empty after every reply, so the inline loop
    waits for the next request each time, in poll(2) (``idle_poll``, the default; with or
    without ``idle_spins`` checks first) or in trio's epoll. A handler that sleeps in a worker
    thread or in trio finishes while the loop waits, and is answered (a wait that missed trio's
    wakeup would hang the client: the watchdog). A trio task's timer fires while the loop waits
    (its ticks keep up). SIGINT to the idle daemon ends it."""
    with loop_fs(tmp_path, loop) as fs:
        for name in MIXED * 2:
            assert (fs.mnt / name).stat().st_size == len(content(name.encode()))
            assert _read(fs.mnt / name) == content(name.encode()), name
        counts = fs.settled()
        if loop == "inline-epoll":
            assert counts["idle_waits"] == 0, counts
        else:
            assert counts["idle_waits"] > len(MIXED), counts
        assert counts["suspended"] >= 2 * 20, counts  # sleep* and thread* reads and lookups
        # Idle for 1.5 s: the ticker (every 50 ms) should tick about 30 times. The count is
        # read through SIGUSR1, which wakes trio itself: a loop that slept past the ticker's
        # deadlines would show one tick or two.
        ticks = fs.counts()["ticks"]
        time.sleep(1.5)
        assert fs.counts()["ticks"] - ticks >= 15, counts
        fs.proc.send_signal(signal.SIGINT)
        assert fs.proc.wait(20) == 0, fs.output()
        assert mounted_fstype(fs.mnt) is None


@pytest.mark.timeout(120)
def test_interrupt_is_read_while_a_handler_sleeps_and_the_request_still_answered(
        tmp_path: Path) -> None:
    """A signal to a process waiting on a FUSE request makes the kernel send FUSE_INTERRUPT.
    pyfuse3 registers no interrupt callback, so libfuse marks the request and the handler's
    answer still arrives; SIGKILL ends the process once the request is answered."""
    reader = ("import os, signal, sys; signal.signal(signal.SIGUSR1, lambda *a: None); "
              "fd = os.open(sys.argv[1], os.O_RDONLY); sys.stdout.buffer.write(os.read(fd, 65536))")
    with loop_fs(tmp_path, "inline") as fs:
        before = fs.counts()
        client = subprocess.Popen([sys.executable, "-c", reader, str(fs.mnt / "slow")],
                                  stdout=subprocess.PIPE)
        try:
            assert wait_until(lambda: fs.counts().get("slow-started", 0) == 1, 20)
            client.send_signal(signal.SIGUSR1)
            # The loop serves others meanwhile, and reads the interrupt.
            mixed_client(fs.mnt, 20)(0)
            assert wait_until(lambda: unhandled(fs.counts()) > unhandled(before), 10)
            out, _ = client.communicate(timeout=SLOW_SECONDS + 20)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(SLOW_SECONDS + 20)
        assert client.returncode == 0
        assert out == content(b"slow")

        killed = subprocess.Popen([sys.executable, "-c", reader, str(fs.mnt / "slow")],
                                  stdout=subprocess.DEVNULL)
        try:
            assert wait_until(lambda: fs.counts().get("slow-started", 0) == 2, 20)
            killed.kill()
            assert killed.wait(SLOW_SECONDS + 20) == -signal.SIGKILL
        finally:
            if killed.poll() is None:
                killed.kill()
                killed.wait(SLOW_SECONDS + 20)
        assert _read(fs.mnt / "fast1") == content(b"fast1")
        fs.settled()


def unhandled(counts: dict[str, int]) -> int:
    """The requests the loop read that no handler got: libfuse answered them itself."""
    return counts["requests"] - counts.get("handled", 0)


def _until_error(mnt: Path) -> Callable[[int], None]:
    """A client that reads until the mount goes away; it must not hang."""
    def client(i: int) -> None:
        rng = random.Random(i)
        with contextlib.suppress(OSError):
            for _ in range(100_000):
                _read(mnt / rng.choice(MIXED))
    return client


@pytest.mark.timeout(120)
def test_unmount_under_load_ends_the_daemon(tmp_path: Path) -> None:
    with loop_fs(tmp_path, "inline") as fs:
        result: list[list[str]] = []
        load = threading.Thread(target=lambda: result.append(
            run_clients(8, _until_error(fs.mnt), timeout=60)), daemon=True)
        load.start()
        time.sleep(1)
        subprocess.run(["fusermount3", "-u", "-z", str(fs.mnt)], check=True, timeout=20)
        assert fs.proc.wait(30) == 0, fs.output()
        load.join(70)
        assert result == [[]], result


# --- under cowfs ------------------------------------------------------------------------------

BIG = 64 * 1024 * 1024


def _stats(path: Path) -> dict[str, int]:
    words = path.read_text().split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}


def _cowfs_load(mnt: Path, ops: int) -> Callable[[int], None]:
    """Client 0 appends to the large lower file (a copy-up in a worker thread); the others stat
    lower files and create, write, read and unlink small files of their own."""
    def client(i: int) -> None:
        if i == 0:
            with (mnt / "big").open("ab") as f:
                f.write(b"tail")
            assert (mnt / "big").stat().st_size == BIG + 4
            return
        rng = random.Random(i)
        for k in range(ops):
            assert (mnt / f"d/f{rng.randrange(200)}").stat().st_size == 3
            own = mnt / f"c{i}-{k}"
            own.write_bytes(b"%d" % k)
            assert own.read_bytes() == b"%d" % k
            if k % 3 == 0:
                own.unlink()
    return client


def _lower(layers: LayerFactory) -> LayerSet:
    return layers({"big": File(b"\0" * BIG), "d/": None,
                   **{f"d/f{i}": File(b"abc") for i in range(200)}})


@pytest.mark.timeout(180)
@pytest.mark.parametrize("loop", ["", "nospin", "inline-epoll", "stock"])
def test_cowfs_copy_up_among_small_requests(
        tmp_path: Path, layers: LayerFactory, mount_cowfs: MountFactory, loop: str) -> None:
    """cowfs runs the inline loop by default (its handlers that wait are counted), waiting for
    requests in poll(2) where pyfuse3 has 0006 (``COWFS_LOOP=inline-epoll``: never;
    ``COWFS_LOOP=nospin``: without checking first), and
    pyfuse3's own loop with ``COWFS_LOOP=stock`` (which counts none)."""
    stats = tmp_path / "loop-stats"
    env = {"COWFS_LOOP_STATS": str(stats), **({"COWFS_LOOP": loop} if loop else {})}
    mount = mount_cowfs(_lower(layers), env=env)
    errors = run_clients(6, _cowfs_load(mount.mnt, 150), timeout=120)
    assert not errors, errors
    assert mount.proc is not None
    os.kill(mount.proc.pid, signal.SIGUSR2)
    assert wait_until(stats.exists, 10)
    counted = _stats(stats)
    assert counted["requests"] > 5 * 150 * 4, counted
    if loop == "stock":
        assert counted["suspended"] == 0, counted
    else:
        assert counted["suspended"] > 0, counted
    if loop in ("inline-epoll", "stock") and "idle_waits" in counted:
        assert counted["idle_waits"] == 0, counted


@pytest.mark.timeout(180)
def test_cowfs_sigint_under_load_unmounts_and_exits(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    mount = mount_cowfs(_lower(layers))
    assert mount.proc is not None
    result: list[list[str]] = []

    def load() -> None:
        client = functools.partial(_swallow, _cowfs_load(mount.mnt, 100_000))
        result.append(run_clients(6, client, timeout=60))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(1.5)
    mount.proc.send_signal(signal.SIGINT)  # what the terminal does on Ctrl-C
    assert mount.proc.wait(30) == 0, mount.describe()
    assert mounted_fstype(mount.mnt) is None
    thread.join(70)
    assert result == [[]], result


def _swallow(client: Callable[[int], None], i: int) -> None:
    """Run a client until the mount goes away (its errors then are expected)."""
    with contextlib.suppress(OSError, AssertionError):
        client(i)
