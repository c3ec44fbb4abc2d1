"""Where the kernel's own semantics meet the new calls (issue 22), in lockstep with the kernel's
overlayfs over ext4: the immutable and append-only flags, the ctime after chattr, the set-ID bits
after a write or fallocate, remount read-only, strictatime, POSIX ACLs, and O_DIRECT writes beside
buffered reads."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conformance_support import (
    ACL_ACCESS,
    ACL_DEFAULT,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    FS_APPEND_FL,
    FS_IMMUTABLE_FL,
    FS_NOATIME_FL,
    Pair,
    acl,
    reference,
    run_op,
    started_pair,
)
from support import Dir, File

from cowfs.daemon.operations import can_inherit_acls, completes_direct_writes, has_file_calls

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(not has_file_calls(), reason="needs patches/pyfuse3/0002 (chattr)"),
]

LOWER = {
    "ad/sub/x": b"x",
    "ad/f": b"f",
    "id/sub/x": b"x",
    "id/f": b"f",
    "af": b"append only",
    "if": b"immutable",
    "d": Dir(),
}
UPPER = {"uad/sub/x": b"x", "uaf": b"upper, append only"}
PROTECTED = {"ad": FS_APPEND_FL, "id": FS_IMMUTABLE_FL, "af": FS_APPEND_FL,
             "if": FS_IMMUTABLE_FL, "uad": FS_APPEND_FL, "uaf": FS_APPEND_FL}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with started_pair(tmp_path, [LOWER], upper=UPPER, **reference()) as p:
        yield p


@contextlib.contextmanager
def protected(pair: Pair) -> Iterator[None]:
    """The PROTECTED flags set on both sides, and cleared again (else nothing could remove the
    layers)."""
    for rel, flag in PROTECTED.items():
        assert pair.run(("chattr", rel, flag)) == "ok"
    try:
        yield
    finally:
        for rel, flag in PROTECTED.items():
            for side in (pair.kernel, pair.cowfs):
                run_op(side, {}, ("chattr", rel, 0, flag))


def test_names_in_an_immutable_or_append_only_directory_cannot_go(pair: Pair) -> None:
    """rmdir of a non-empty directory in one is EPERM (not ENOTEMPTY), and so is unlinking a
    lower file (cowfs would otherwise whiteout it), as the kernel checks the parent first."""
    with protected(pair):
        for d in ("ad", "id", "uad"):
            assert pair.run(("rmdir", f"{d}/sub")) == "EPERM", d
        for d in ("ad", "uad"):  # sub itself is not protected
            # (not below "id": cowfs cannot copy sub up into an immutable upper directory, where
            # the kernel's overlayfs keeps the flag in an xattr: docs/filesystems.md)
            assert pair.run(("unlink", f"{d}/sub/x")) == "ok", d
        for d in ("ad", "id"):
            assert pair.run(("unlink", f"{d}/f")) == "EPERM", d
            assert pair.run(("rename", f"{d}/f", "d/f")) == "EPERM", d
        assert pair.run(("open", "ad/new", "cx")) == "ok"  # append-only: names may be added
        assert pair.run(("open", "id/new", "cx")) == "EPERM"
        for d in ("ad", "id", "uad"):
            assert pair.run(("lsattr", d)) == PROTECTED[d]
        pair.check()


def test_an_append_only_file_opens_for_appending(pair: Pair) -> None:
    """O_WRONLY|O_APPEND and O_RDWR|O_APPEND open (and append), O_WRONLY alone does not."""
    with protected(pair):
        for f in ("af", "uaf"):
            assert pair.run(("open_write", f, "O_WRONLY|O_APPEND", b"+1")) > 0, f
            assert pair.run(("open_write", f, "O_RDWR|O_APPEND", b"+2")) > 0, f
            assert pair.run(("open", f, "w")) == "EPERM", f
            assert pair.run(("open", f, "O_RDWR")) == "EPERM", f
            assert pair.run(("truncate", f, 0)) == "EPERM", f
        assert pair.run(("open", "if", "O_WRONLY|O_APPEND")) == "EPERM"
        pair.check()


def test_utime_now_on_an_append_only_object(pair: Pair) -> None:
    """utime(path, NULL) sets both times to now on an append-only file or directory; explicit
    times are refused (EPERM), and on an immutable object both are."""
    with protected(pair):
        for rel in ("af", "uaf", "ad", "uad"):
            assert pair.run(("utimensat", rel, "now", "now")) == "ok", rel
            assert pair.run(("utime", rel, 10**18, 10**18)) == "EPERM", rel
        for rel in ("if", "id"):
            assert pair.run(("utimensat", rel, "now", "now")) == "EPERM", rel
        pair.check()


@pytest.mark.parametrize("rel", ["af", "uaf", "d"])
def test_chattr_changes_the_ctime_seen_through_the_mount(pair: Pair, rel: str) -> None:
    """chattr +A and -A change the ctime (of the upper copy); stat shows it at once."""
    for flags in ((FS_NOATIME_FL, 0), (0, FS_NOATIME_FL)):
        changed = []
        for side in (pair.kernel, pair.cowfs):
            before = os.stat(side / rel).st_ctime_ns  # cached by the kernel from here on
            time.sleep(0.01)  # past a coarse clock's granularity
            assert run_op(side, {}, ("chattr", rel, *flags)) == "ok"
            changed.append(os.stat(side / rel).st_ctime_ns > before)
        assert changed == [True, True], (rel, flags)
    pair.check()


USER, GROUP = 1000, 1000
SETID_MODES = (0o6666, 0o6766, 0o6776, 0o6777)
SETID = {
    **{f"{where}-{mode:o}-{group}": File(content=b"x" * 8192, mode=mode, uid=USER, gid=gid)
       for mode in SETID_MODES for group, gid in (("theirs", 0), ("mine", GROUP))
       for where in ("lo", "up")},
    "chmod-theirs": File(mode=0o755, uid=USER, gid=0),
    "chmod-mine": File(mode=0o755, uid=USER, gid=GROUP),
}


@pytest.fixture
def setid_pair(tmp_path: Path) -> Iterator[Pair]:
    lower = {k: v for k, v in SETID.items() if not k.startswith("up-")}
    upper = {k: v for k, v in SETID.items() if k.startswith("up-")}
    with started_pair(tmp_path, [lower], upper=upper, cowfs_options=("allow_other",),
                      public=True, **reference()) as p:
        yield p


@pytest.mark.parametrize("how", ["allocate", "punch", "zero", "write"])
def test_a_change_by_a_user_drops_set_id_bits_as_the_kernel(setid_pair: Pair, how: str) -> None:
    """After fallocate (each mode) or a write: S_ISUID always goes; S_ISGID goes when the group
    may execute, or when the caller is not in the file's group (setattr_should_drop_sgid)."""
    modes = {"allocate": 0, "punch": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
             "zero": FALLOC_FL_ZERO_RANGE}
    for rel in SETID:
        if rel.startswith(("lo-", "up-")):
            step = (("pwrite", rel, 100, b"y") if how == "write"
                    else ("fallocate", rel, modes[how], 0, 4096))
            assert setid_pair.run_as(USER, GROUP, step) == "ok"
            assert setid_pair.run(("stat", rel)) is not None
    setid_pair.check()


def test_chmod_by_an_owner_outside_the_group_drops_setgid(setid_pair: Pair) -> None:
    """chmod g+s by the owner keeps S_ISGID only if the owner is in the file's group."""
    for rel in ("chmod-theirs", "chmod-mine"):
        assert setid_pair.run_as(USER, GROUP, ("chmod", rel, 0o2755)) == "ok"
        setid_pair.run(("stat", rel))
    setid_pair.check()


def _remount(mnt: Path, flags: str) -> None:
    """``mount -o remount,FLAGS MNT`` (through mount.fuse.cowfs for cowfs)."""
    done = subprocess.run(["mount", "-o", f"remount,{flags}", str(mnt)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, f"mount -o remount,{flags} {mnt}: {done.stderr}"


def test_remount_read_only_and_back(pair: Pair) -> None:
    """mount -o remount,ro: writes fail EROFS, reads work and leave the upper's access times
    alone (the upper file's atime would move by relatime's rule: it is not after its mtime);
    remount,rw: writes work again."""
    uppers = [pair.kernel_side.upper / "uaf", pair.cowfs_side.upper / "uaf"]
    for side in (pair.kernel, pair.cowfs):
        _remount(side, "ro")
    before = [os.stat(p).st_atime_ns for p in uppers]
    assert pair.run(("open_write", "uaf", "a", b"more")) == "EROFS"
    assert pair.run(("mkdir", "new")) == "EROFS"
    assert pair.run(("read", "uaf")) == b"upper, append only"
    assert pair.run(("listdir", "uad")) == ["sub"]
    assert [os.stat(p).st_atime_ns for p in uppers] == before, "a read changed the upper"
    for side in (pair.kernel, pair.cowfs):
        _remount(side, "rw")
    assert pair.run(("open_write", "uaf", "a", b"more")) == 22
    assert pair.run(("mkdir", "new")) == "ok"
    pair.check()


@pytest.fixture
def strict_pair(tmp_path: Path) -> Iterator[Pair]:
    with started_pair(tmp_path, [LOWER], upper=UPPER, kernel_options=("strictatime",),
                      cowfs_options=("strictatime",)) as p:
        yield p


def test_strictatime_sets_the_access_time_on_every_read(strict_pair: Pair) -> None:
    """-o strictatime: each read of an upper file sets its access time, also where the upper's
    own mount (relatime) would not, and stat through the mount shows it."""
    for side in (strict_pair.kernel, strict_pair.cowfs):
        times = []
        for _ in range(3):
            (side / "uaf").read_bytes()
            times.append(os.stat(side / "uaf").st_atime_ns)
            time.sleep(0.02)  # past a coarse clock's granularity
        assert times[0] < times[1] < times[2], side


# --- POSIX ACLs ------------------------------------------------------------------------------

ACL_LOWER = {"f": File(b"f", mode=0o440), "d": Dir(mode=0o755), "d/old": File(),
             "s": Dir(mode=0o2775),
             "w": File(b"w", mode=0o2777, uid=0, gid=0)}


@pytest.fixture
def acl_pair(tmp_path: Path) -> Iterator[Pair]:
    with started_pair(tmp_path, [ACL_LOWER], cowfs_options=("allow_other",), public=True,
                      **reference()) as p:
        yield p


def test_access_acls_as_the_kernel_applies_them(acl_pair: Pair) -> None:
    """An access ACL sets the mode's group bits to its mask and keeps the owner's; a chmod by
    the owner outside the file's group drops S_ISGID (the kernel applies both: enable_acl)."""
    run = acl_pair.run
    assert run(("setxattr", "f", ACL_ACCESS, acl("u::r--", "U:1000:rw-", "g::r--", "m::rw-",
                                                 "o::---"))) == "ok"
    assert run(("stat", "f"))[0] == "-r--rw----"
    assert acl_pair.run_as(1000, 1000, ("read", "f")) == b"f"  # the named user's entry
    assert run(("chmod", "f", 0o400)) == "ok"
    run(("getxattr", "f", ACL_ACCESS))
    assert acl_pair.run_as(1000, 1000, ("read", "f")) == "EACCES"  # the mask is --- now
    assert run(("chown", "w", 1000, 0)) == "ok"
    assert acl_pair.run_as(1000, 1000, ("setxattr", "w", ACL_ACCESS,
                                        acl("u::rwx", "g::rwx", "o::rwx"))) == "ok"
    assert run(("stat", "w"))[0] == "-rwxrwxrwx"
    acl_pair.check()


@pytest.mark.skipif(not can_inherit_acls(), reason="needs patches/pyfuse3/0004 (make setup)")
def test_default_acls_are_inherited_in_place_of_the_umask(acl_pair: Pair) -> None:
    """A default ACL is inherited by new files and directories in place of the umask, also in a
    set-group-ID directory and over a whiteout (built in the work directory)."""
    run = acl_pair.run
    os.umask(0o022)
    assert run(("unlink", "d/old")) == "ok"
    for d in ("d", "s"):
        assert run(("setxattr", d, ACL_DEFAULT, acl("u::rwx", "g::rwx", "o::r-x"))) == "ok"
        assert run(("mkdir", f"{d}/sub", 0o777)) == "ok"
        assert run(("open", f"{d}/new", "cx", 0o666)) == "ok"
        assert run(("setxattr", d, ACL_DEFAULT, acl("u::rwx", "U:1000:r-x", "g::r-x",
                                                    "m::rwx", "o::---"))) == "ok"
        assert run(("mkdir", f"{d}/named", 0o750)) == "ok"
        for rel in (f"{d}/sub", f"{d}/new", f"{d}/named"):
            run(("stat", rel))
            run(("getxattr", rel, ACL_ACCESS))
        run(("getxattr", f"{d}/sub", ACL_DEFAULT))
    assert run(("open", "d/old", "cx", 0o666)) == "ok"  # over the whiteout
    run(("stat", "d/old"))
    assert run(("stat", "d/sub"))[0] == "drwxrwxr-x"
    assert run(("stat", "s/sub"))[0] == "drwxrwsr-x"
    acl_pair.check()


@pytest.mark.skipif(not can_inherit_acls(), reason="needs patches/pyfuse3/0004 (make setup)")
def test_a_default_acl_given_or_taken_after_files_were_made_applies_to_the_next(
        acl_pair: Pair) -> None:
    """cowfs remembers that a directory has no default ACL (it is read at every create):
    setting one, or removing it, applies to the next object made there, as on the kernel."""
    run = acl_pair.run
    os.umask(0o022)
    assert run(("mkdir", "e", 0o777)) == "ok"
    assert run(("open", "e/a", "cx", 0o666)) == "ok"
    assert run(("open", "e/a2", "cx", 0o666)) == "ok"  # the absence remembered is used
    assert run(("setxattr", "e", ACL_DEFAULT, acl("u::rwx", "g::rwx", "o::rwx"))) == "ok"
    assert run(("open", "e/b", "cx", 0o666)) == "ok"
    assert run(("mkdir", "e/bd", 0o777)) == "ok"
    assert run(("removexattr", "e", ACL_DEFAULT)) == "ok"
    assert run(("open", "e/c", "cx", 0o666)) == "ok"
    for rel in ("e/a", "e/a2", "e/b", "e/bd", "e/c"):
        run(("stat", rel))
        run(("getxattr", rel, ACL_ACCESS))
    assert run(("stat", "e/a"))[0] == "-rw-r--r--"
    assert run(("stat", "e/b"))[0] == "-rw-rw-rw-"
    assert run(("stat", "e/c"))[0] == "-rw-r--r--"
    acl_pair.check()


# --- O_DIRECT writes beside buffered reads -------------------------------------------------------

BLOCK = 4096
_SYS_IO_SETUP, _SYS_IO_DESTROY, _SYS_IO_GETEVENTS, _SYS_IO_SUBMIT = 206, 207, 208, 209  # x86_64
_IOCB_CMD_PWRITE = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Iocb(ctypes.Structure):
    _fields_ = [("aio_data", ctypes.c_uint64), ("aio_key", ctypes.c_uint32),
                ("aio_rw_flags", ctypes.c_int32), ("aio_lio_opcode", ctypes.c_uint16),
                ("aio_reqprio", ctypes.c_int16), ("aio_fildes", ctypes.c_uint32),
                ("aio_buf", ctypes.c_uint64), ("aio_nbytes", ctypes.c_uint64),
                ("aio_offset", ctypes.c_int64), ("aio_reserved2", ctypes.c_uint64),
                ("aio_flags", ctypes.c_uint32), ("aio_resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]


def _syscall(*args: object) -> int:
    result = _libc.syscall(*args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def _submit_and_wait(ctx: ctypes.c_ulong, iocbs: ctypes.Array[_Iocb]) -> None:
    """io_submit all of ``iocbs`` at once (all in flight), then io_getevents until all are done."""
    count = len(iocbs)
    pointers = (ctypes.POINTER(_Iocb) * count)(*(ctypes.pointer(iocb) for iocb in iocbs))
    assert _syscall(_SYS_IO_SUBMIT, ctx, count, pointers) == count
    events = (_IoEvent * count)()
    done = 0
    while done < count:
        done += _syscall(_SYS_IO_GETEVENTS, ctx, count - done, count - done,
                         ctypes.byref(events, done * ctypes.sizeof(_IoEvent)), None)
    assert all(event.res == BLOCK for event in events), [event.res for event in events]


def stale_reads_after_direct_writes(path: Path, blocks: int, seconds: float,
                                    readers: int = 2) -> tuple[int, int]:
    """Rounds of ``blocks`` asynchronous O_DIRECT writes of one block each, all in flight at
    once, while ``readers`` threads read the blocks buffered (128 KiB at a time) through another
    descriptor; after each round, a buffered read of each block must show the round's bytes.
    Returns (rounds run, the first round a read showed older bytes in, or 0)."""
    direct = os.open(path, os.O_RDWR | os.O_DIRECT)
    buffered = os.open(path, os.O_RDONLY)
    buf = mmap.mmap(-1, blocks * BLOCK)  # page-aligned, as O_DIRECT needs
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    ctx = ctypes.c_ulong(0)
    _syscall(_SYS_IO_SETUP, blocks, ctypes.byref(ctx))
    stop = threading.Event()

    def read_around() -> None:
        while not stop.is_set():
            os.pread(buffered, 128 << 10, 0)

    threads = [threading.Thread(target=read_around) for _ in range(readers)]
    for thread in threads:
        thread.start()
    rounds = stale = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not stale:
            rounds += 1
            pattern = rounds.to_bytes(4, "little") * (BLOCK // 4)
            iocbs = (_Iocb * blocks)()
            for block in range(blocks):
                buf[block * BLOCK:(block + 1) * BLOCK] = pattern
                iocbs[block] = _Iocb(aio_lio_opcode=_IOCB_CMD_PWRITE, aio_fildes=direct,
                                     aio_buf=address + block * BLOCK, aio_nbytes=BLOCK,
                                     aio_offset=block * BLOCK)
            _submit_and_wait(ctx, iocbs)
            if any(os.pread(buffered, BLOCK, block * BLOCK) != pattern
                   for block in range(blocks)):
                stale = rounds
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        _syscall(_SYS_IO_DESTROY, ctx)
        del address  # the buffer can close only once nothing points into it
        buf.close()
        os.close(buffered)
        os.close(direct)
    return rounds, stale


@pytest.fixture
def dio_pair(tmp_path: Path) -> Iterator[Pair]:
    """A lower file copied up partly by its first write (-o partial_copyup=1M: cowfs then writes
    in worker threads), and an upper file."""
    size = 1 << 20
    with started_pair(tmp_path, [{"partial": b"\0" * size}], upper={"up": b"\0" * size},
                      cowfs_options=("partial_copyup=1M",)) as p:
        yield p


@pytest.mark.skipif(not completes_direct_writes(),
                    reason="needs pyfuse3 with patches/pyfuse3/0005 (enable_async_dio)")
@pytest.mark.parametrize("rel", ["partial", "up"])
def test_a_buffered_read_after_a_direct_write_sees_it(dio_pair: Pair, rel: str) -> None:
    """Asynchronous O_DIRECT writes and buffered reads of the same blocks: a read issued after
    a write completed returns the written bytes, as on the kernel's overlayfs, in 3 s of each
    (the kernel's FUSE drops no cached pages after a direct write that completes asynchronously;
    cowfs turns asynchronous direct I/O off, so that it drops them after every direct write)."""
    for side in (dio_pair.kernel, dio_pair.cowfs):
        rounds, stale = stale_reads_after_direct_writes(side / rel, 16, 3.0)
        assert rounds > 10, f"{side}: only {rounds} rounds"
        assert not stale, f"{side}: round {stale} of {rounds} read older bytes"
