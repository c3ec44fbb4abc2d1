"""The calls data jobs make beyond read and write, against the kernel's overlayfs on the same
layers (issue 11, section 4): fallocate in each mode, lseek SEEK_DATA/SEEK_HOLE, the file
attributes of chattr/lsattr (FS_IOC_GETFLAGS/SETFLAGS, FS_IOC_FSGETXATTR), chown(-1, -1), and the
two that FUSE does not pass on (O_TMPFILE, FIEMAP), which fail on cowfs as documented
(docs/layer-format.md, "What FUSE does not pass on").

fallocate, lseek and the file attributes need a pyfuse3 with their handlers
(patches/pyfuse3/0002-*.patch); each of their tests runs twice: with them, and as on a stock
pyfuse3 (``COWFS_STOCK_PYFUSE3=1`` in the daemon's environment), where cowfs must do what the
kernel does when the server has no such handler.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import itertools
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import LayerFactory, MountFactory
from fs_support import fiemap_extents
from support import KernelOverlay, Twin

from cowfs.daemon.operations import has_file_calls

pytestmark = pytest.mark.kernel

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

#: Modes the kernel's FUSE passes on (fs/fuse/file.c refuses the others with EOPNOTSUPP).
FUSE_MODES = {
    "allocate": 0,
    "keep-size": FALLOC_FL_KEEP_SIZE,
    "punch-hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
    "zero-range": FALLOC_FL_ZERO_RANGE,
    "zero-range-keep-size": FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
}
NOT_PASSED_MODES = {"collapse-range": FALLOC_FL_COLLAPSE_RANGE,
                    "insert-range": FALLOC_FL_INSERT_RANGE}

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_NOATIME_FL = 0x80
FS_NODUMP_FL = 0x40

BLOCK = 4096
#: A lower file of 64 KiB of distinct bytes (a multiple of the block size, for the range modes).
DATA = bytes(range(256)) * 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: How :func:`outcome` spells EOPNOTSUPP (errno.errorcode says ENOTSUP: the same number on Linux).
NOTSUP = errno.errorcode[errno.EOPNOTSUPP]


def outcome(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


ALL_MODES = {**FUSE_MODES, **NOT_PASSED_MODES}


@dataclass(frozen=True)
class Pyfuse3:
    """Which pyfuse3 the daemon acts as: its environment, and whether the calls reach cowfs."""

    env: dict[str, str]
    file_calls: bool


@pytest.fixture(params=["patched", "stock"], ids=lambda p: f"pyfuse3-{p}")
def pyfuse3_kind(request: pytest.FixtureRequest) -> Pyfuse3:
    if request.param == "stock":
        return Pyfuse3({"COWFS_STOCK_PYFUSE3": "1"}, file_calls=False)
    if request.param == "installed":  # for the tests that do not depend on it
        return Pyfuse3({}, file_calls=has_file_calls())
    if not has_file_calls():
        pytest.skip("this pyfuse3 has no fallocate/lseek/ioctl handlers: make setup builds one "
                    "with patches/pyfuse3/")
    return Pyfuse3({}, file_calls=True)


@pytest.fixture
def data_twin(layers: LayerFactory, mount_cowfs: MountFactory,
              pyfuse3_kind: Pyfuse3) -> Iterator[Twin]:
    """A lower file ``data`` and an upper file ``up``, and one of each per fallocate mode, under
    the kernel's overlay and under cowfs."""
    lower: dict[str, object] = {"data": DATA, "dir/f": b"in a directory"}
    upper: dict[str, object] = {"up": DATA}
    for name in ALL_MODES:
        lower[f"lower-{name}"] = DATA
        upper[f"upper-{name}"] = DATA
    ref = layers(lower, upper=upper)
    kernel = KernelOverlay(ref.lowers, ref.upper, ref.work, ref.mnt)
    kernel.start()
    try:
        yield Twin(kernel, mount_cowfs(layers(lower, upper=upper), env=pyfuse3_kind.env))
    finally:
        kernel.stop()


def _fallocate_then_state(path: Path, mode: int) -> object:
    def run() -> object:
        fd = os.open(path, os.O_RDWR)
        try:
            fallocate(fd, mode, 2 * BLOCK, 4 * BLOCK)
        finally:
            os.close(fd)
        content = path.read_bytes()
        return len(content), hashlib.sha256(content).hexdigest()
    return outcome(run)


def test_fallocate_modes(data_twin: Twin, pyfuse3_kind: Pyfuse3) -> None:
    """Each mode on a lower file (copied up first) and on an upper file: the same size and
    content as under the kernel where FUSE passes the mode on; EOPNOTSUPP where it does not."""
    for layer in ("lower", "upper"):
        for name, mode in ALL_MODES.items():
            target = f"{layer}-{name}"
            expected = _fallocate_then_state(data_twin.reference.mnt / target, mode)
            actual = _fallocate_then_state(data_twin.subject.mnt / target, mode)
            assert expected != NOTSUP, "the kernel's overlay on ext4 supports every mode"
            if name in NOT_PASSED_MODES or not pyfuse3_kind.file_calls:
                assert actual == NOTSUP, target
            else:
                assert actual == expected, target
    refused = NOT_PASSED_MODES if pyfuse3_kind.file_calls else ALL_MODES
    for layer in ("lower", "upper"):
        for name in refused:  # a refused call changed nothing
            assert (data_twin.subject.mnt / f"{layer}-{name}").read_bytes() == DATA


def _seeks(path: Path) -> list[object]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [outcome(lambda o=o, w=w: os.lseek(fd, o, w))  # type: ignore[misc]
                for w in (os.SEEK_DATA, os.SEEK_HOLE)
                for o in (0, BLOCK, 256 * BLOCK, 257 * BLOCK, 1024 * BLOCK)]
    finally:
        os.close(fd)


def _make_sparse(path: Path) -> None:
    """Data at 256 blocks, a hole before it and after it up to 1024 blocks."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"x" * BLOCK, 256 * BLOCK)
        os.ftruncate(fd, 1024 * BLOCK)
    finally:
        os.close(fd)


def test_seek_data_and_hole(layers: LayerFactory, mount_cowfs: MountFactory,
                            pyfuse3_kind: Pyfuse3) -> None:
    """SEEK_DATA/SEEK_HOLE on a sparse lower file as the kernel's overlay answers them, then on
    its upper copy as that file does; on a stock pyfuse3 as if all were data (the kernel's
    fallback)."""
    ref = layers({"sparse": b""})
    sub = layers({"sparse": b""})
    for layer_set in (ref, sub):
        _make_sparse(layer_set.lowers[0] / "sparse")
    kernel = KernelOverlay(ref.lowers, ref.upper, ref.work, ref.mnt)
    kernel.start()
    try:
        mount = mount_cowfs(sub, env=pyfuse3_kind.env)
        for when in ("lower", "upper"):
            # The kernel copies up in chunks of 1 MiB, writing zeros after data as data; cowfs
            # keeps the holes exactly. Either is right: after copy-up, cowfs answers as the
            # real upper copy does.
            expected = _seeks((ref.mnt if when == "lower" else sub.upper) / "sparse")
            actual = _seeks(mount.mnt / "sparse")
            if pyfuse3_kind.file_calls:
                assert actual == expected, when
            else:
                size = 1024 * BLOCK
                assert actual == [0, BLOCK, 256 * BLOCK, 257 * BLOCK, "ENXIO",
                                  size, size, size, size, "ENXIO"], when
            for root in (ref.mnt, mount.mnt):
                with open(root / "sparse", "r+b") as f:  # copy-up keeps the holes
                    f.write(b"y")
    finally:
        kernel.stop()


def _flags(path: Path) -> object:
    def run() -> object:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            buf = bytearray(8)
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
            flags = struct.unpack_from("=I", buf)[0]
            xattr = bytearray(28)
            fcntl.ioctl(fd, FS_IOC_FSGETXATTR, xattr, True)
            return flags, bytes(xattr)
        finally:
            os.close(fd)
    return outcome(run)


def _set_flags(path: Path, add: int) -> object:
    def run() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            buf = bytearray(8)
            fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
            flags = struct.unpack_from("=I", buf)[0] | add
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("=Q", flags))
        finally:
            os.close(fd)
    return outcome(run)


def test_file_attributes(data_twin: Twin, pyfuse3_kind: Pyfuse3) -> None:
    """lsattr and chattr on a lower file, an upper file, a lower directory and the root: read
    from the topmost copy, set on the upper copy after copy-up, the lower unchanged (the fixture
    checks it); ENOTTY on a stock pyfuse3."""
    for target in ("data", "up", "dir", "."):
        ref, sub = data_twin.reference.mnt / target, data_twin.subject.mnt / target
        if not pyfuse3_kind.file_calls:
            assert _flags(sub) == "ENOTTY"
            assert _set_flags(sub, FS_NODUMP_FL) == "ENOTTY"
            continue
        assert _flags(sub) == _flags(ref), target
        wanted = FS_NODUMP_FL | FS_NOATIME_FL
        assert _set_flags(ref, wanted) is None
        assert _set_flags(sub, wanted) is None, target
        after = _flags(sub)
        assert after == _flags(ref), target
        assert isinstance(after, tuple)
        assert after[0] & wanted == wanted
    data_twin.assert_same_view()


@pytest.mark.parametrize("pyfuse3_kind", ["installed"], indirect=True)
def test_chown_unchanged_updates_ctime(data_twin: Twin) -> None:
    """chown(path, -1, -1) of a lower and an upper file changes only the ctime, under the
    kernel's overlay and ext4 alike."""
    for root, target in itertools.product((data_twin.reference.mnt, data_twin.subject.mnt),
                                          ("data", "up")):
        path = root / target
        os.chown(path, -1, -1)  # a lower file is copied up by the first one
        before = os.stat(path)
        time.sleep(0.02)  # past the granularity of a coarse clock: ctime must be able to move
        os.chown(path, -1, -1)
        after = os.stat(path)
        assert after.st_ctime_ns > before.st_ctime_ns, root
        assert (after.st_mtime_ns, after.st_uid, after.st_gid) == (
            before.st_mtime_ns, before.st_uid, before.st_gid)


@pytest.mark.parametrize("pyfuse3_kind", ["installed"], indirect=True)
def test_o_tmpfile_is_not_passed_on(data_twin: Twin) -> None:
    """O_TMPFILE works under the kernel's overlay; the kernel's FUSE sends FUSE_TMPFILE, which
    libfuse 3.14 has no handler for, so it fails EOPNOTSUPP on cowfs (documented)."""
    def tmpfile(root: Path) -> object:
        def run() -> object:
            fd = os.open(root / "dir", os.O_TMPFILE | os.O_RDWR, 0o600)
            try:
                return os.write(fd, b"scratch")
            finally:
                os.close(fd)
        return outcome(run)

    assert tmpfile(data_twin.reference.mnt) == 7
    assert tmpfile(data_twin.subject.mnt) == NOTSUP


@pytest.mark.parametrize("pyfuse3_kind", ["installed"], indirect=True)
def test_fiemap_is_not_passed_on(data_twin: Twin) -> None:
    """FIEMAP works under the kernel's overlay; the kernel's FUSE has no fiemap operation, so it
    fails EOPNOTSUPP on cowfs (documented). SEEK_DATA/SEEK_HOLE find the same holes."""
    assert fiemap_extents(data_twin.reference.mnt / "data")
    assert outcome(lambda: fiemap_extents(data_twin.subject.mnt / "data")) == NOTSUP
