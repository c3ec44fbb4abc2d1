"""Copy-up on a real mount: every trigger promotes a lower file to the upper with its data, mode,
owner, timestamps and xattrs, parents first with their own metadata; O_TRUNC copies no data; holes
stay holes; reading never copies up; two writers racing get one copy; and a long copy-up does not
hold up other requests."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import LayerFactory, MountFactory
from support import (
    DEFAULT_WORK_NAME,
    AccessWatch,
    CowfsMount,
    Device,
    Dir,
    Fifo,
    File,
    is_whiteout,
    sha256_of,
    tree_state,
    wait_until,
)

from cowfs.core import inline

MiB = 1 << 20
DATA = b"lower data\n" * 100
OLD_NS = 978_307_200_123_456_789  # 2001-01-01, with nanoseconds
PRIVATE_PREFIXES = ("user.overlay.", "user.cowfs.", "trusted.overlay.")


def source_spec(atime_ns: int) -> dict[str, Any]:
    return {
        "d1/": Dir(mode=0o750, uid=11, gid=12, xattrs={"user.d1": b"1"}, times_ns=(OLD_NS, OLD_NS)),
        "d1/d2/": Dir(
            mode=0o701, uid=21, gid=22, xattrs={"user.d2": b"2"}, times_ns=(OLD_NS, OLD_NS + 1)
        ),
        "d1/d2/f": File(
            DATA,
            mode=0o640,
            uid=1234,
            gid=5678,
            xattrs={"user.a": b"1", "trusted.t": b"2", "security.s": b"3"},
            times_ns=(atime_ns, OLD_NS + 2),
        ),
        "d1/d2/sib": None,
        "other/": Dir(),
    }


@pytest.fixture
def source(layers: LayerFactory, mount_cowfs: MountFactory) -> CowfsMount:
    # atime an hour ago and after mtime: relatime will not bump it when the file is read.
    atime_ns = time.time_ns() - 3600 * 10**9 + 987
    return mount_cowfs(layers(source_spec(atime_ns), {"d1/d2/below": None}),
                       options=["metacopy"])


def public_xattrs(path: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
        if not n.startswith(PRIVATE_PREFIXES)
    }


def attributes(path: Path, *, with_data: bool = True) -> dict[str, Any]:
    st = os.lstat(path)  # before reading the data, which may touch atime
    found = {
        "kind": stat.S_IFMT(st.st_mode),
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "atime_ns": st.st_atime_ns,
        "xattrs": public_xattrs(path),
    }
    if with_data:
        found["data"] = read_noatime(path)
    return found


def read_noatime(path: Path) -> bytes:
    """Read without touching atime (relatime would bump it when atime <= mtime)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Trigger:
    name: str
    act: Callable[[Path], None]  # given the mount root
    path: str = "d1/d2/f"  # where the file is afterwards
    changes: dict[str, Any] = field(default_factory=dict)  # expected differences from the lower
    keeps_times: bool = True  # mtime and atime as in the lower
    keeps_parent_mtime: bool = True  # d1/d2's mtime as in the lower
    metacopy: bool = False  # copied up without its data (cowfs.core.metacopy)

    def __str__(self) -> str:
        return self.name


def _open_close(flags: int) -> Callable[[Path], None]:
    return lambda mnt: os.close(os.open(mnt / "d1/d2/f", flags))


F = "d1/d2/f"
TRIGGERS = [
    Trigger("open_wronly", _open_close(os.O_WRONLY)),
    Trigger("open_rdwr", _open_close(os.O_RDWR)),
    Trigger(
        "open_trunc",
        _open_close(os.O_WRONLY | os.O_TRUNC),
        changes={"data": b"", "size": 0},
        keeps_times=False,
    ),
    Trigger("chmod", lambda mnt: os.chmod(mnt / F, 0o604), changes={"mode": 0o604},
            metacopy=True),
    # To an owner that is neither the lower file's nor the upper's: the data is copied.
    Trigger("chown", lambda mnt: os.chown(mnt / F, 99, 98), changes={"uid": 99, "gid": 98}),
    Trigger("chgrp", lambda mnt: os.chown(mnt / F, -1, 98), changes={"gid": 98},
            metacopy=True),
    Trigger(
        "utime",
        lambda mnt: os.utime(mnt / F, ns=(5_000_000_001, 6_000_000_002)),
        changes={"atime_ns": 5_000_000_001, "mtime_ns": 6_000_000_002},
        metacopy=True,
    ),
    Trigger(
        "truncate",
        lambda mnt: os.truncate(mnt / F, 5),
        changes={"data": DATA[:5], "size": 5},
        keeps_times=False,
    ),
    Trigger(
        "setxattr",
        lambda mnt: os.setxattr(mnt / F, "user.new", b"v"),
        changes={
            "xattrs": {"user.a": b"1", "trusted.t": b"2", "security.s": b"3", "user.new": b"v"}
        },
        metacopy=True,
    ),
    Trigger(
        "removexattr",
        lambda mnt: os.removexattr(mnt / F, "user.a"),
        changes={"xattrs": {"trusted.t": b"2", "security.s": b"3"}},
        metacopy=True,
    ),
    Trigger("link", lambda mnt: os.link(mnt / F, mnt / "other/hard"), metacopy=True),
    Trigger(
        "rename",
        lambda mnt: os.rename(mnt / F, mnt / "other/moved"),
        path="other/moved",
        keeps_parent_mtime=False,  # d1/d2 lost an entry
        metacopy=True,
    ),
]


@pytest.mark.parametrize("trigger", TRIGGERS, ids=str)
def test_trigger_copies_up_with_data_and_metadata(source: CowfsMount, trigger: Trigger) -> None:
    lower_file = source.lowers[0] / F
    expected = attributes(lower_file) | trigger.changes
    if not trigger.keeps_times:
        del expected["mtime_ns"], expected["atime_ns"]

    trigger.act(source.mnt)

    upper_file = source.upper / trigger.path
    assert upper_file.exists(), f"{trigger} did not copy {F} up"
    found = attributes(upper_file)
    if not trigger.keeps_times:
        del found["mtime_ns"], found["atime_ns"]
    marked = os.getxattr(upper_file, "user.overlay.metacopy") if "user.overlay.metacopy" in (
        os.listxattr(upper_file)) else None
    if trigger.metacopy:
        # The data stayed in the lower file: the upper copy is sparse, and marked.
        assert marked == b"", "metacopy mark"
        assert found.pop("data") == bytes(len(DATA))
        assert os.stat(upper_file).st_blocks * 512 < len(DATA) + 4096
        assert found == {k: v for k, v in expected.items() if k != "data"}, "upper copy"
    else:
        assert marked is None, "metacopy mark"
        assert found == expected, "upper copy"
    through_mount = attributes(source.mnt / trigger.path)
    for key in ("mtime_ns", "atime_ns"):
        if trigger.keeps_times:
            assert through_mount.pop(key) == expected[key], key
        else:
            through_mount.pop(key)
    assert through_mount == {k: v for k, v in expected.items() if not k.endswith("time_ns")}


@pytest.mark.parametrize("trigger", TRIGGERS, ids=str)
def test_parents_are_copied_up_first_with_their_metadata(
    source: CowfsMount, trigger: Trigger
) -> None:
    trigger.act(source.mnt)
    for rel in ("d1", "d1/d2"):
        lower = attributes(source.lowers[0] / rel, with_data=False)
        del lower["atime_ns"], lower["size"]  # listing a dir touches atime; sizes are per fs
        if rel == "d1/d2" and not trigger.keeps_parent_mtime:
            del lower["mtime_ns"]
        for where in (source.upper, source.mnt):
            found = attributes(where / rel, with_data=False)
            found = {k: v for k, v in found.items() if k in lower}
            assert found == lower, f"{where / rel}"


def test_link_copy_up_gives_one_inode_with_two_names(source: CowfsMount) -> None:
    os.link(source.mnt / F, source.mnt / "other/hard")
    first, second = os.lstat(source.upper / F), os.lstat(source.upper / "other/hard")
    assert (first.st_ino, first.st_nlink) == (second.st_ino, 2)


def test_rename_copy_up_leaves_a_whiteout(source: CowfsMount) -> None:
    os.rename(source.mnt / F, source.mnt / "other/moved")
    assert is_whiteout(source.upper / F)
    assert not (source.mnt / F).exists()
    assert (source.mnt / "other/moved").read_bytes() == DATA


def test_writes_after_copy_up_go_to_the_upper(source: CowfsMount) -> None:
    with open(source.mnt / F, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"appended")
    assert (source.upper / F).read_bytes() == DATA + b"appended"
    assert (source.mnt / F).read_bytes() == DATA + b"appended"
    source.remount()
    assert (source.mnt / F).read_bytes() == DATA + b"appended"


def test_o_trunc_copies_no_data(source: CowfsMount) -> None:
    sibling = source.lowers[0] / "d1/d2/sib"
    target = source.lowers[0] / F
    with AccessWatch(sibling) as sibling_reads, AccessWatch(target) as target_reads:
        # The probe works: serving a read through the mount reads the lower file.
        assert (source.mnt / "d1/d2/sib").read_bytes() == b"lower0:d1/d2/sib"
        assert sibling_reads.accessed()
        os.close(os.open(source.mnt / F, os.O_WRONLY | os.O_TRUNC))
        assert not target_reads.accessed(), "O_TRUNC copy-up read the lower file's data"
    assert (source.upper / F).read_bytes() == b""
    assert stat.S_IMODE(os.lstat(source.upper / F).st_mode) == 0o640
    assert os.lstat(source.upper / F).st_uid == 1234


def upper_objects(mount: CowfsMount) -> dict[str, tuple[str, str | None]]:
    """What the upper holds, by kind and content (bookkeeping xattrs may change)."""
    state = tree_state(mount.upper, times=False, skip=[DEFAULT_WORK_NAME])
    return {rel: (entry.kind, entry.sha256) for rel, entry in state.items()}


def test_reading_does_not_copy_up(cowfs: CowfsMount) -> None:
    before = upper_objects(cowfs)
    mnt = cowfs.mnt
    with open(mnt / "a.txt", "rb") as f:
        assert f.read() == b"lower0:a.txt"
        os.fstat(f.fileno())
    os.lstat(mnt / "dir/x")
    os.listxattr(mnt / "dir/x")
    with pytest.raises(OSError):
        os.getxattr(mnt / "dir/x", "user.none")
    assert os.readlink(mnt / "link") == "a.txt"
    assert sorted(os.listdir(mnt / "deep/er/est")) == ["file"]
    assert os.access(mnt / "b.txt", os.W_OK)
    (mnt / "dir/sub/z").read_bytes()
    assert upper_objects(cowfs) == before


def test_holes_survive_copy_up(layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    layer_set = layers({"other/": None})
    sparse = layer_set.lowers[0] / "sparse"
    payload = os.urandom(4096)
    with open(sparse, "wb") as f:
        f.truncate(100 * MiB)
        f.seek(50 * MiB)
        f.write(payload)
    assert os.stat(sparse).st_blocks * 512 <= 256 * 1024, "premise: the lower file is sparse"
    # A full copy (a partial one would copy no data at all: test_mount_partial.py).
    mount = mount_cowfs(layer_set, options=["nopartial_copyup"])
    os.close(os.open(mount.mnt / "sparse", os.O_WRONLY))  # a chmod would copy no data at all
    upper = os.stat(mount.upper / "sparse")
    assert upper.st_size == 100 * MiB
    assert upper.st_blocks * 512 <= 1 * MiB, f"copy-up filled holes: {upper.st_blocks} blocks"
    assert sha256_of(mount.upper / "sparse") == sha256_of(sparse)
    with open(mount.mnt / "sparse", "rb") as f:
        f.seek(50 * MiB)
        assert f.read(4096) == payload


@pytest.mark.layers(
    {
        "sym@": "target",
        "fifo": Fifo(0o640),
        "null": Device("c", 1, 3, 0o666),
        "d/": Dir(),
    }
)
def test_special_files_copy_up_as_themselves(cowfs: CowfsMount) -> None:
    os.chown(cowfs.mnt / "sym", 7, 7, follow_symlinks=False)
    os.chmod(cowfs.mnt / "fifo", 0o600)
    os.chmod(cowfs.mnt / "null", 0o660)
    assert os.readlink(cowfs.upper / "sym") == "target"
    assert os.lstat(cowfs.upper / "sym").st_uid == 7
    fifo = os.lstat(cowfs.upper / "fifo")
    assert stat.S_ISFIFO(fifo.st_mode)
    assert stat.S_IMODE(fifo.st_mode) == 0o600
    null = os.lstat(cowfs.upper / "null")
    assert stat.S_ISCHR(null.st_mode)
    assert null.st_rdev == os.makedev(1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o660


def test_racing_writers_share_one_copy_up(layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    count, size = 16, 8192
    mount = mount_cowfs(layers({f"shared/f{i}": File(b"." * size) for i in range(count)}))
    errors: list[BaseException] = []

    def writer(path: Path, both_open: threading.Barrier, offset: int, marker: bytes) -> None:
        try:
            both_open.wait(timeout=30)  # start together
            fd = os.open(path, os.O_WRONLY)
            try:
                both_open.wait(timeout=30)  # neither writes before both hold a descriptor
                os.pwrite(fd, marker, offset)
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    for i in range(count):
        path = mount.mnt / f"shared/f{i}"
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=writer, args=(path, barrier, 0, b"AAAA")),
            threading.Thread(target=writer, args=(path, barrier, 4096, b"BBBB")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        expected = b"AAAA" + b"." * 4092 + b"BBBB" + b"." * (size - 4100)
        assert path.read_bytes() == expected, f"f{i}: a writer's data was lost"
        assert (mount.upper / f"shared/f{i}").read_bytes() == expected


def _copy_started(upper: Path, free_before: int) -> bool:
    """Some sign that the big copy-up is writing: a non-empty file in the upper (work dir
    included), or 64 MiB fewer free blocks on the upper's filesystem."""
    for dirpath, _, files in os.walk(upper):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_size or st.st_blocks):
                return True
    vfs = os.statvfs(upper)
    return (free_before - vfs.f_bfree) * vfs.f_frsize >= 64 * MiB


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_long_copy_up_does_not_block_other_requests(
    layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    layer_set = layers({f"other/s{i}": None for i in range(5)})
    big = layer_set.lowers[0] / "big"
    block = os.urandom(MiB)
    with open(big, "wb") as f:
        for i in range(512):
            f.write(i.to_bytes(8, "little") + block[8:])
    mount = mount_cowfs(layer_set, options=["nopartial_copyup"])  # a full copy: it takes long
    opened = threading.Event()
    errors: list[BaseException] = []

    def copy_up() -> None:
        try:
            os.close(os.open(mount.mnt / "big", os.O_WRONLY))
        except BaseException as e:
            errors.append(e)
        finally:
            opened.set()

    free_before = os.statvfs(mount.upper).f_bfree
    thread = threading.Thread(target=copy_up)
    thread.start()
    try:
        started = wait_until(
            lambda: opened.is_set() or _copy_started(mount.upper, free_before), 120, 0.002
        )
        assert started, "no sign of the copy-up within 120 s"
        assert not opened.is_set(), (
            "the copy-up finished before it could be observed; the test needs a bigger file"
        )
        for i in range(5):
            os.stat(mount.mnt / f"other/s{i}")
            assert not opened.is_set(), f"stat {i} waited for the copy-up to finish"
    finally:
        thread.join(timeout=500)
    assert not errors, errors
    assert sha256_of(mount.upper / "big") == sha256_of(big)


def _open_deep(root: Path, components: list[str], flags: int) -> int:
    """Open ``root/components...`` one component at a time (the whole path is past PATH_MAX
    for a single call)."""
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
    try:
        for part in components[:-1]:
            child = os.open(part, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.open(components[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (/tmp/cwXXXXXXXX), removed after the mounts' teardown:
    the fixtures' checks of a lower layer walk it by absolute paths, which must stay below
    PATH_MAX."""
    path = Path(tempfile.mkdtemp(prefix="cw", dir="/tmp"))
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize("options", [(), ("metacopy",)])
def test_a_file_under_a_4000_byte_path_copies_up(
        short_dir: Path, layers: LayerFactory, mount_cowfs: MountFactory,
        options: tuple[str, ...]) -> None:
    """15 nested 255-byte directories and a 200-byte name: the origin (layer-format.md section
    12) records the 4,041-byte path's digest, which fits ext4's xattr space where the path gave
    ENOSPC; the inode number survives the copy-up and a remount, as on the kernel."""
    layer_set = layers({})
    names = [f"{i:02d}" + "d" * 253 for i in range(15)] + ["f" * 200]
    parent = os.open(short_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        for name in names[:-1]:
            os.mkdir(name, dir_fd=parent)
            child = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=parent)
            os.close(parent)
            parent = child
        fd = os.open(names[-1], os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=parent)
        os.write(fd, b"deep data")
        os.close(fd)
    finally:
        os.close(parent)
    assert len("/" + "/".join(names)) == 4041
    mount = mount_cowfs(layer_set, options=list(options), lowers=[short_dir])
    fd = _open_deep(mount.mnt, names, os.O_RDONLY)
    number = os.fstat(fd).st_ino
    os.close(fd)
    fd = _open_deep(mount.mnt, names, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b" and more")
        assert os.fstat(fd).st_ino == number
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    fd = _open_deep(layer_set.upper, names, os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"deep data and more"
        assert os.getxattr(fd, "user.cowfs.origin").split(b":")[2] == b"sha256"
    finally:
        os.close(fd)
    mount.remount()
    fd = _open_deep(mount.mnt, names, os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"deep data and more"
        assert os.fstat(fd).st_ino == number
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [1000, inline.COPY_MAX, inline.COPY_MAX + 1, 1 << 20])
def test_small_copy_ups_inline_and_large_ones_in_a_thread_copy_the_whole_file(
        layers: LayerFactory, mount_cowfs: MountFactory, size: int) -> None:
    """A copy-up of up to ``inline.COPY_MAX`` bytes runs on the request loop; a larger one stops
    before its copy and the whole operation runs again in a worker thread (cowfs/core/inline.py).
    Either way each file comes up whole, once, and the work directory is left empty (checked at
    teardown)."""
    data = os.urandom(size)
    names = ("renamed", "linked", "chmodded", "xattr", "opened")
    layer_set = layers({name: File(data) for name in names})
    # nometacopy: a metadata change or a rename copies the data too (metacopy would copy none).
    mount = mount_cowfs(layer_set, options=["nometacopy"])
    mnt = mount.mnt
    os.rename(mnt / "renamed", mnt / "moved")
    os.link(mnt / "linked", mnt / "link2")
    os.chmod(mnt / "chmodded", 0o600)
    os.setxattr(mnt / "xattr", "user.k", b"v")
    os.close(os.open(mnt / "opened", os.O_WRONLY))
    now = ("moved", "linked", "link2", "chmodded", "xattr", "opened")
    for name in now:
        assert (mnt / name).read_bytes() == data, name
        assert (layer_set.upper / name).read_bytes() == data, f"{name}: not copied up whole"
    assert not (mnt / "renamed").exists()
    assert os.stat(mnt / "linked").st_ino == os.stat(mnt / "link2").st_ino
    mount.remount()
    for name in now:
        assert (mnt / name).read_bytes() == data, f"{name}, after a remount"
