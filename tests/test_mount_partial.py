"""Copy-up of only the written ranges (issue 11, section 2; cowfs.core.partial), on real mounts.

A lower file of at least ``-o partial_copyup=SIZE`` bytes opened for writing is copied up as a
partial file: the upper copy holds the 64 KiB blocks written, the rest is read from the lower.
Checked here: random sequences of writes, truncations, shared mmap writes, O_DIRECT,
copy_file_range and fallocate on partly copied files, against a model and in lockstep with the
kernel's overlayfs (which copies whole files), across remounts; the space a small write costs;
st_blocks; SEEK_DATA/SEEK_HOLE; fsync'd data after the daemon is killed; completion (chown to
another owner, punching holes); the offline tools (diff, export, commit) giving the full content;
a malformed map; a clone instead on an upper with reflinks. The fixtures check after every test
that the lower layers are unchanged byte for byte and that ``cowfs check`` finds no problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import mmap
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LayerFactory, MountFactory
from fs_support import fs_available, scratch_fs
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from support import CowfsMount, KernelOverlay, find_cowfs, needs_root

from cowfs.core import realfs, schema

MiB = 1 << 20
BLOCK = 64 << 10
TINY = "partial_copyup=1"  # every non-empty file copies up partly


def _datamap(path: Path) -> bytes | None:
    try:
        return os.getxattr(path, schema.XATTR_DATAMAP, follow_symlinks=False)
    except OSError:
        return None


def _cowfs(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(find_cowfs()), *args], capture_output=True, text=True,
                          timeout=120, check=check)


def _write_at(path: Path, offset: int, data: bytes, flags: int = 0) -> None:
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        if flags & os.O_DIRECT:  # the kernel's overlay (on ext4) wants an aligned buffer
            with mmap.mmap(-1, len(data)) as aligned:
                aligned.write(data)
                assert os.pwrite(fd, aligned, offset) == len(data)
        else:
            assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


# --- the space and time of a small write into a large file ------------------------------------


def test_a_small_write_into_a_large_file_copies_one_block(layers: LayerFactory,
                                                           mount_cowfs: MountFactory) -> None:
    layer_set = layers({})
    big = layer_set.lowers[0] / "big"
    original = os.urandom(64 * MiB)  # the default threshold: 64 MiB
    big.write_bytes(original)
    mount = mount_cowfs(layer_set)
    _write_at(mount.mnt / "big", 30 * MiB + 100, b"w" * 4096)
    expected = bytearray(original)
    expected[30 * MiB + 100:30 * MiB + 4196] = b"w" * 4096
    upper = layer_set.upper / "big"
    assert os.stat(upper).st_blocks * 512 <= 3 * BLOCK, "more than the written blocks came up"
    assert _datamap(upper) is not None
    assert (mount.mnt / "big").read_bytes() == bytes(expected)
    # st_blocks: the lower file's share of what it still provides, and the upper copy's.
    blocks = os.stat(mount.mnt / "big").st_blocks
    lower_blocks = os.stat(big).st_blocks
    assert lower_blocks - 2 * BLOCK // 512 <= blocks <= lower_blocks + 3 * BLOCK // 512
    mount.remount()
    assert (mount.mnt / "big").read_bytes() == bytes(expected)


def test_below_the_threshold_and_with_the_option_off_files_copy_whole(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    layer_set = layers({})
    (layer_set.lowers[0] / "small").write_bytes(os.urandom(3 * MiB))
    (layer_set.lowers[0] / "large").write_bytes(os.urandom(3 * MiB))
    (layer_set.lowers[0] / "off").write_bytes(os.urandom(3 * MiB))
    mount = mount_cowfs(layer_set, options=["partial_copyup=3M"])
    _write_at(mount.mnt / "large", 0, b"x")
    assert _datamap(layer_set.upper / "large") is not None
    mount.stop()
    mount = mount_cowfs(layer_set, options=["partial_copyup=4M"])
    _write_at(mount.mnt / "small", 0, b"x")
    assert _datamap(layer_set.upper / "small") is None
    assert os.stat(layer_set.upper / "small").st_blocks * 512 >= 3 * MiB
    mount.stop()
    mount = mount_cowfs(layer_set, options=["partial_copyup=1M,nopartial_copyup"])
    _write_at(mount.mnt / "off", 0, b"x")
    assert _datamap(layer_set.upper / "off") is None


@pytest.mark.parametrize("value", ["abc", "-1", "1X", "", "1.5G"])
def test_a_bad_threshold_is_refused_clearly(layers: LayerFactory, value: str) -> None:
    layer_set = layers({"f": None})
    result = _cowfs("mount", "-o", f"partial_copyup={value}", str(layer_set.lowers[0]),
                    str(layer_set.upper), str(layer_set.mnt), check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "partial_copyup" in result.stderr, result.stderr


# --- lockstep with the kernel's overlayfs and a model ------------------------------------------

FILES = 40
SIZES = [5 * BLOCK + 1234, 2 * BLOCK, 700, 9 * BLOCK - 1]


def _lower_content(i: int) -> bytes:
    return os.urandom(SIZES[i % len(SIZES)])


def _op_strategy() -> st.SearchStrategy[tuple[object, ...]]:
    offset = st.integers(0, 10 * BLOCK)
    return st.one_of(
        st.tuples(st.just("pwrite"), offset, st.integers(1, 3 * BLOCK)),
        st.tuples(st.just("truncate"), st.integers(0, 10 * BLOCK)),
        st.tuples(st.just("mmap"), offset, st.integers(1, 2 * BLOCK)),
        st.tuples(st.just("direct"), st.integers(0, 40), st.integers(1, 4)),
        st.tuples(st.just("copy_range"), offset, st.integers(1, 2 * BLOCK)),
        st.tuples(st.just("allocate"), offset, st.integers(1, 2 * BLOCK)),
        st.tuples(st.just("punch"), offset, st.integers(1, 2 * BLOCK)),
        st.tuples(st.just("remount")),
    )


def _apply(path: Path, op: tuple[object, ...], payload: bytes) -> None:
    """One operation on ``path`` (a file in a mount); ``payload``: the bytes it writes."""
    kind = op[0]
    if kind == "pwrite":
        _write_at(path, int(op[1]), payload)  # type: ignore[call-overload]
    elif kind == "truncate":
        os.truncate(path, int(op[1]))  # type: ignore[call-overload]
    elif kind == "mmap":
        offset = int(op[1])  # type: ignore[call-overload]
        fd = os.open(path, os.O_RDWR)
        try:
            end = offset + len(payload)
            if os.fstat(fd).st_size < end:
                os.ftruncate(fd, end)
            with mmap.mmap(fd, end) as m:
                m[offset:end] = payload
                m.flush()
        finally:
            os.close(fd)
    elif kind == "direct":
        _write_at(path, int(op[1]) * 4096, payload, os.O_DIRECT)  # type: ignore[call-overload]
    elif kind == "copy_range":
        src = path.parent / (path.name + ".src")
        src.write_bytes(payload)
        fd_in, fd_out = os.open(src, os.O_RDONLY), os.open(path, os.O_WRONLY)
        try:
            done = 0
            while done < len(payload):
                n = os.copy_file_range(fd_in, fd_out, len(payload) - done, done,
                                       int(op[1]) + done)  # type: ignore[call-overload]
                assert n > 0
                done += n
        finally:
            os.close(fd_in)
            os.close(fd_out)
        src.unlink()
    elif kind in ("allocate", "punch"):
        mode = 0x01 if kind == "allocate" else 0x03  # KEEP_SIZE; KEEP_SIZE|PUNCH_HOLE
        fd = os.open(path, os.O_RDWR)
        try:
            realfs.fallocate(fd, mode, int(op[1]), int(op[2]))  # type: ignore[call-overload]
        finally:
            os.close(fd)
    else:
        raise AssertionError(kind)


def _model_apply(model: bytearray, op: tuple[object, ...], payload: bytes) -> None:
    kind = op[0]
    if kind == "truncate":
        size = int(op[1])  # type: ignore[call-overload]
        del model[size:]
        model += bytes(size - len(model))
        return
    if kind == "allocate":
        return
    if kind == "punch":
        offset, length = int(op[1]), int(op[2])  # type: ignore[call-overload]
        end = min(offset + length, len(model))
        if offset < end:
            model[offset:end] = bytes(end - offset)
        return
    offset = int(op[1]) * (4096 if kind == "direct" else 1)  # type: ignore[call-overload]
    if offset > len(model):
        model += bytes(offset - len(model))
    model[offset:offset + len(payload)] = payload


def _payload(op: tuple[object, ...]) -> bytes:
    if op[0] in ("pwrite", "mmap", "copy_range"):
        return os.urandom(int(op[2]))  # type: ignore[call-overload]
    if op[0] == "direct":
        return os.urandom(int(op[2]) * 4096)  # type: ignore[call-overload]
    return b""


@contextlib.contextmanager
def _twins(layers: LayerFactory, mount_cowfs: MountFactory) -> Iterator[
        tuple[CowfsMount, KernelOverlay, list[bytes]]]:
    needs_root("the kernel's overlayfs")
    contents = [_lower_content(i) for i in range(FILES)]
    spec = {f"f{i}": None for i in range(FILES)}
    ref = layers(spec)
    subject_set = layers(spec)
    for layer_set in (ref, subject_set):
        for i, data in enumerate(contents):
            (layer_set.lowers[0] / f"f{i}").write_bytes(data)
    kernel = KernelOverlay(ref.lowers, ref.upper, ref.work, ref.mnt)
    kernel.start()
    try:
        yield mount_cowfs(subject_set, options=[TINY]), kernel, contents
    finally:
        kernel.stop()


@pytest.mark.timeout(600)
def test_random_changes_match_the_model_and_the_kernel(layers: LayerFactory,
                                                       mount_cowfs: MountFactory) -> None:
    """Each example changes a fresh lower file (FILES of them) in both overlays."""
    with _twins(layers, mount_cowfs) as (subject, kernel, contents):
        used = iter(range(FILES))

        # No shrinking: every example needs a fresh lower file; the trail says what failed.
        @settings(max_examples=FILES - 4, deadline=None, database=None,
                  phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
        @given(st.lists(_op_strategy(), min_size=2, max_size=8))
        @example([("truncate", 100), ("truncate", 4 * BLOCK), ("pwrite", 3 * BLOCK, 10)])
        @example([("pwrite", BLOCK - 3, 6), ("truncate", BLOCK), ("remount",),
                  ("mmap", BLOCK + 5, 100)])
        @example([("punch", 10, BLOCK), ("pwrite", 20, 5), ("truncate", 7 * BLOCK)])
        def run(ops: list[tuple[object, ...]]) -> None:
            i = next(used)
            name = f"f{i}"
            model = bytearray(contents[i])
            trail: list[str] = []
            for op in ops:
                trail.append(repr(op))
                if op[0] == "remount":
                    subject.remount()
                    continue
                payload = _payload(op)
                _apply(subject.mnt / name, op, payload)
                _apply(kernel.mnt / name, op, payload)
                _model_apply(model, op, payload)
                got = (subject.mnt / name).read_bytes()
                assert got == (kernel.mnt / name).read_bytes(), f"differs from kernel: {trail}"
                assert got == bytes(model), f"differs from the model after {trail}"
                assert os.stat(subject.mnt / name).st_size == len(model)
            subject.remount()
            assert (subject.mnt / name).read_bytes() == bytes(model), f"after remount: {trail}"

        run()


# --- calls on partial files ---------------------------------------------------------------------


@pytest.fixture
def partial_file(layers: LayerFactory, mount_cowfs: MountFactory) -> tuple[CowfsMount,
                                                                           bytearray]:
    """A mount with ``big`` (8 blocks and a bit) already partly copied up: block 2 written."""
    layer_set = layers({})
    original = os.urandom(8 * BLOCK + 100)
    (layer_set.lowers[0] / "big").write_bytes(original)
    mount = mount_cowfs(layer_set, options=[TINY])
    model = bytearray(original)
    _write_at(mount.mnt / "big", 2 * BLOCK + 7, b"two")
    model[2 * BLOCK + 7:2 * BLOCK + 10] = b"two"
    assert _datamap(mount.upper / "big") is not None
    return mount, model


def test_seek_data_and_hole_see_the_whole_file_as_data(
        partial_file: tuple[CowfsMount, bytearray]) -> None:
    mount, model = partial_file
    fd = os.open(mount.mnt / "big", os.O_RDONLY)
    try:
        assert os.lseek(fd, 100, os.SEEK_DATA) == 100
        assert os.lseek(fd, 100, os.SEEK_HOLE) == len(model)
        with pytest.raises(OSError) as e:
            os.lseek(fd, len(model), os.SEEK_DATA)
        assert e.value.errno == errno.ENXIO
    finally:
        os.close(fd)


def test_a_reader_open_before_the_write_sees_it(layers: LayerFactory,
                                                mount_cowfs: MountFactory) -> None:
    layer_set = layers({})
    (layer_set.lowers[0] / "big").write_bytes(bytes(4 * BLOCK))
    mount = mount_cowfs(layer_set, options=[TINY, "timeout=0"])
    with open(mount.mnt / "big", "rb", buffering=0) as reader:
        _write_at(mount.mnt / "big", BLOCK, b"new")
        # O_DIRECT-free read of a range the kernel has not cached: it reaches cowfs.
        assert os.pread(reader.fileno(), 3, BLOCK) == b"new"


def test_chown_to_another_owner_completes_the_file(
        partial_file: tuple[CowfsMount, bytearray]) -> None:
    mount, model = partial_file
    needs_root("chown")
    os.chown(mount.mnt / "big", 4321, 4321)
    upper = mount.upper / "big"
    assert _datamap(upper) is None
    assert schema.XATTR_METACOPY not in os.listxattr(upper)
    assert upper.read_bytes() == bytes(model), "completion lost a block"
    assert (mount.mnt / "big").read_bytes() == bytes(model)


def test_punching_a_hole_completes_the_file(partial_file: tuple[CowfsMount, bytearray]) -> None:
    mount, model = partial_file
    fd = os.open(mount.mnt / "big", os.O_RDWR)
    try:
        realfs.fallocate(fd, 0x03, 5 * BLOCK, 100)
    finally:
        os.close(fd)
    model[5 * BLOCK:5 * BLOCK + 100] = bytes(100)
    assert _datamap(mount.upper / "big") is None
    assert (mount.mnt / "big").read_bytes() == bytes(model)
    assert (mount.upper / "big").read_bytes() == bytes(model)


def test_a_file_whose_every_block_came_up_becomes_ordinary(
        partial_file: tuple[CowfsMount, bytearray]) -> None:
    mount, model = partial_file
    data = os.urandom(len(model))
    _write_at(mount.mnt / "big", 0, data)
    assert _datamap(mount.upper / "big") is None
    assert (mount.upper / "big").read_bytes() == data


def test_the_offline_tools_give_the_full_content(partial_file: tuple[CowfsMount, bytearray],
                                                 tmp_path: Path) -> None:
    mount, model = partial_file
    mount.stop()
    upper, lower = mount.upper, mount.lowers[0]
    diff = _cowfs("diff", str(upper), "--lower", str(lower))
    assert "big" in diff.stdout
    layer = tmp_path / "layer.tar"
    _cowfs("export", str(upper), "--lower", str(lower), "-o", str(layer))
    with tarfile.open(layer) as tar:
        member = tar.extractfile("./big")
        assert member is not None
        assert member.read() == bytes(model), "export wrote the upper copy's holes"
    assert _datamap(upper / "big") is not None, "export changed the upper"


def test_commit_gives_the_base_the_full_content(layers: LayerFactory) -> None:
    """Not through the mount fixture: it checks that the lower is unchanged, and commit changes
    it on purpose."""
    layer_set = layers({})
    base = layer_set.lowers[0]
    original = os.urandom(5 * BLOCK)
    (base / "big").write_bytes(original)
    mount = CowfsMount([base], layer_set.upper, layer_set.mnt, options=[TINY],
                       command=find_cowfs(), log_dir=layer_set.root, watchdog=60.0)
    mount.start()
    try:
        _write_at(mount.mnt / "big", 3 * BLOCK + 1, b"committed")
    finally:
        mount.stop()
    assert _datamap(layer_set.upper / "big") is not None
    _cowfs("commit", str(layer_set.upper), "--into", str(base), "--yes")
    expected = bytearray(original)
    expected[3 * BLOCK + 1:3 * BLOCK + 10] = b"committed"
    assert (base / "big").read_bytes() == bytes(expected)
    assert _datamap(base / "big") is None


def test_fsynced_writes_survive_a_killed_daemon(layers: LayerFactory,
                                                mount_cowfs: MountFactory) -> None:
    layer_set = layers({})
    original = os.urandom(6 * BLOCK)
    (layer_set.lowers[0] / "big").write_bytes(original)
    mount = mount_cowfs(layer_set, options=[TINY])
    fd = os.open(mount.mnt / "big", os.O_WRONLY)
    os.pwrite(fd, b"synced", BLOCK + 10)
    os.fsync(fd)
    os.pwrite(fd, b"unsynced", 4 * BLOCK + 10)  # not fsync'd, not closed: may be lost
    assert mount.proc is not None
    os.kill(mount.proc.pid, signal.SIGKILL)
    assert mount.detach_dead() == -signal.SIGKILL
    with contextlib.suppress(OSError):
        os.close(fd)
    mount.start()
    got = (mount.mnt / "big").read_bytes()
    assert got[BLOCK + 10:BLOCK + 16] == b"synced"
    assert got[4 * BLOCK + 10:4 * BLOCK + 18] in (b"unsynced", original[4 * BLOCK + 10:
                                                                        4 * BLOCK + 18])
    rest = bytearray(got)
    rest[BLOCK + 10:BLOCK + 16] = original[BLOCK + 10:BLOCK + 16]
    rest[4 * BLOCK + 10:4 * BLOCK + 18] = original[4 * BLOCK + 10:4 * BLOCK + 18]
    assert bytes(rest) == original, "bytes nobody wrote changed"


@pytest.mark.layer_check(False, reason="the data map is malformed on purpose")
def test_a_malformed_map_fails_reads_with_eio_and_check_reports_it(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    layer_set = layers({})
    (layer_set.lowers[0] / "big").write_bytes(os.urandom(3 * BLOCK))
    mount = mount_cowfs(layer_set, options=[TINY])
    _write_at(mount.mnt / "big", 0, b"x")
    mount.stop()
    os.setxattr(layer_set.upper / "big", schema.XATTR_DATAMAP, b"1 65536 99 99 5-3")
    mount = mount_cowfs(layer_set, options=[TINY])
    with pytest.raises(OSError) as e:
        (mount.mnt / "big").read_bytes()
    assert e.value.errno == errno.EIO
    mount.stop()
    check = _cowfs("check", str(layer_set.upper), "--lower", str(layer_set.lowers[0]),
                   check=False)
    assert check.returncode != 0
    assert "data map is malformed" in check.stdout + check.stderr


@pytest.fixture
def xfs_root(tmp_path: Path) -> Iterator[Path]:
    if not fs_available("xfs"):
        pytest.skip("no XFS in this kernel")
    with scratch_fs("xfs", tmp_path, "fs-xfs") as root:
        yield root


def test_an_upper_with_reflinks_clones_instead(xfs_root: Path, layers: LayerFactory,
                                               mount_cowfs: MountFactory) -> None:
    base = layers()
    lower, upper, work = xfs_root / "lower", xfs_root / "upper", xfs_root / "work"
    for d in (lower, upper, work):
        d.mkdir()
    data = os.urandom(4 * MiB)
    (lower / "big").write_bytes(data)
    layer_set = dataclasses.replace(base, lowers=[lower], upper=upper, work=work)
    mount = mount_cowfs(layer_set, work=work, options=[TINY])
    _write_at(mount.mnt / "big", 10, b"x")
    assert _datamap(upper / "big") is None, "a partial copy where a clone was as cheap"
    assert (mount.mnt / "big").read_bytes() == data[:10] + b"x" + data[11:]


def test_copied_layers_mounted_with_relocate_keep_partial_and_metacopy_data(
        layers: LayerFactory, mount_cowfs: MountFactory, tmp_path: Path) -> None:
    """cp -a of the base and the upper, then -o relocate: the copies' inode numbers differ from
    the origins', so the mount finds each marked file's data file by its origin's path again
    (and rewrites the origin); a later mount without relocate reads them too, and so does
    commit --relocate of another copy."""
    layer_set = layers({})
    base = layer_set.lowers[0]
    original = os.urandom(4 * BLOCK)
    (base / "big").write_bytes(original)
    (base / "meta").write_bytes(original[::-1])
    mount = mount_cowfs(layer_set, options=[TINY, "metacopy"])
    _write_at(mount.mnt / "big", BLOCK + 3, b"moved")
    os.chmod(mount.mnt / "meta", 0o600)
    mount.stop()
    expected = bytearray(original)
    expected[BLOCK + 3:BLOCK + 8] = b"moved"
    copies = tmp_path / "copies"
    copies.mkdir()
    for source in (base, layer_set.upper):
        subprocess.run(["cp", "-a", str(source), str(copies / source.name)], check=True,
                       timeout=60)
    copied = dataclasses.replace(layer_set, lowers=[copies / base.name],
                                 upper=copies / layer_set.upper.name)
    spare = tmp_path / "spare"  # for commit --relocate, a copy of the copy
    subprocess.run(["cp", "-a", str(copies), str(spare)], check=True, timeout=60)
    mount = mount_cowfs(copied, options=["relocate", "metacopy"])
    assert (mount.mnt / "big").read_bytes() == bytes(expected)
    assert (mount.mnt / "meta").read_bytes() == original[::-1]
    mount.stop()
    mount = mount_cowfs(copied)
    assert (mount.mnt / "big").read_bytes() == bytes(expected)
    mount.stop()
    _cowfs("commit", str(spare / layer_set.upper.name), "--into", str(spare / base.name),
           "--relocate", "--yes")
    assert (spare / base.name / "big").read_bytes() == bytes(expected)
    assert (spare / base.name / "meta").read_bytes() == original[::-1]


def test_a_write_whose_blocks_cannot_be_recorded_fails_and_close_does_not(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """cowfs answers no FLUSH (one request fewer per close), so the write that brings blocks of a
    partial file up records the map before it returns: when that fails (ENOSPC on the map's
    xattr, injected), the write reports it, its bytes are not the file's, and close succeeds."""
    original = os.urandom(4 * BLOCK)
    counted = layers({})
    (counted.lowers[0] / "big").write_bytes(original)
    count = counted.root / "count"
    mount = mount_cowfs(counted, options=[TINY], env={"COWFS_FAULT": f"count:{count}"})
    _write_at(mount.mnt / "big", BLOCK + 10, b"recorded")
    mount.stop()
    assert _datamap(counted.upper / "big") is not None
    maps = [int(line.split()[0]) for line in count.read_text().splitlines()
            if line.split()[1] == "setxattr" and schema.XATTR_DATAMAP in line]
    failing = layers({})
    (failing.lowers[0] / "big").write_bytes(original)
    mount = mount_cowfs(failing, options=[TINY], env={"COWFS_FAULT": f"{maps[-1]}:ENOSPC"})
    fd = os.open(mount.mnt / "big", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as failed:
            os.pwrite(fd, b"recorded", BLOCK + 10)
        assert failed.value.errno == errno.ENOSPC
    finally:
        os.close(fd)  # raises nothing
    assert (mount.mnt / "big").read_bytes() == original
    mount.remount()
    assert (mount.mnt / "big").read_bytes() == original
