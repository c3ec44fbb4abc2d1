"""Listings cached by the kernel (issue 12): with the pyfuse3 that `make setup` builds
(patches/pyfuse3/0001), cowfs's opendir asks the kernel to cache each listing, so a repeated
listing never reaches the daemon. These tests check that the cache is used, that cowfs still
works the old way on a stock pyfuse3 (``COWFS_STOCK_PYFUSE3=1`` in the daemon's environment makes
it act as on one) and with ``-o timeout=0``, and, in lockstep with the kernel's overlayfs, that no
cached listing is ever stale after a change through the mount, including the changes cowfs makes
on its own (whiteouts, opaque directories, redirects, copy-up of directories, the index)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pyfuse3
import pytest
from conftest import DEFAULT_LOWERS, DEFAULT_UPPER, LayerFactory, MountFactory
from support import RENAME_EXCHANGE, DirStream, Step, Twin

from cowfs.daemon.operations import can_cache_listings

LAYERS: tuple[dict[str, object], ...] = ({"d/lower1": None, "d/lower2": None},)


def test_make_setup_built_the_patched_pyfuse3() -> None:
    # make setup builds pyfuse3 with patches/pyfuse3/ (scripts/build-pyfuse3.sh): without the
    # patch every listing reaches the daemon and the warm metadata workloads are 10-100x slower.
    assert hasattr(pyfuse3.FileInfo(), "cache_readdir"), (
        "pyfuse3 lacks FileInfo.cache_readdir: run make setup (scripts/build-pyfuse3.sh)")
    assert hasattr(pyfuse3.Operations, "enable_readdirplus_auto")
    assert can_cache_listings() == (os.environ.get("COWFS_STOCK_PYFUSE3") != "1")


def _behind_the_back(upper: Path) -> None:
    """Add a name to the upper directly, which a mount must not be used for: a listing the
    kernel has cached does not show it, one that reaches cowfs does. The directory keeps its
    mtime, which the kernel compares with its cached listing's (a change drops the cache)."""
    st = (upper / "d").stat()
    (upper / "d" / "behind").write_bytes(b"")
    os.utime(upper / "d", ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_repeated_listing_is_served_by_the_kernel(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    if not can_cache_listings():
        pytest.skip("COWFS_STOCK_PYFUSE3=1: this run checks the stock-pyfuse3 path")
    layer_set = layers(*LAYERS, upper={"d/": None})
    mount = mount_cowfs(layer_set)
    first = sorted(os.listdir(mount.mnt / "d"))
    assert first == ["lower1", "lower2"]
    _behind_the_back(layer_set.upper)
    assert sorted(os.listdir(mount.mnt / "d")) == first, "the second listing reached cowfs"
    # A change through the mount drops the cached listing: the next one is read anew.
    (mount.mnt / "d" / "new").write_bytes(b"")
    assert sorted(os.listdir(mount.mnt / "d")) == ["behind", "lower1", "lower2", "new"]
    (mount.mnt / "d" / "behind").unlink()  # so that the layer check sees a consistent layer


@pytest.mark.parametrize("how", ["stock-pyfuse3", "timeout=0"])
def test_without_the_cache_every_listing_reaches_cowfs(
        layers: LayerFactory, mount_cowfs: MountFactory, how: str) -> None:
    layer_set = layers(*LAYERS, upper={"d/": None})
    if how == "stock-pyfuse3":
        mount = mount_cowfs(layer_set, env={"COWFS_STOCK_PYFUSE3": "1"})
    else:
        mount = mount_cowfs(layer_set, options=["timeout=0"])
    assert sorted(os.listdir(mount.mnt / "d")) == ["lower1", "lower2"]
    _behind_the_back(layer_set.upper)
    assert sorted(os.listdir(mount.mnt / "d")) == ["behind", "lower1", "lower2"]
    (mount.mnt / "d" / "x").write_bytes(b"")
    assert sorted(os.listdir(mount.mnt / "d")) == ["behind", "lower1", "lower2", "x"]


# Every kind of change to a directory's entries, on lower, upper and merged objects, including
# those after which cowfs writes whiteouts, opaque marks, redirects and index entries. Before and
# after each step every directory is listed on both mounts, so each step meets cached listings.
CHANGES: list[Step] = [
    ("unlink", "a.txt"),
    ("create", "a.txt"),
    ("rename", "dir/x", "x-moved"),
    ("rename", "x-moved", "dir/x"),
    ("rename", "dir", "dir-renamed"),  # a merged directory with lower content: a redirect
    ("mkdir", "dir"),  # over the whiteout the rename left: opaque
    ("rename", "dir-renamed/sub", "dir/sub"),
    ("link", "b.txt", "dir/b-link"),  # a lower file: copy-up and the index
    ("unlink", "b.txt"),
    ("symlink", "target", "only0/sym"),
    ("mkfifo", "only1/fifo"),
    ("rmtree", "deep"),
    ("mkdir", "deep"),
    ("chmod", "shadow", 0o600),  # copy-up of a file over a lower directory
    ("chmod", "empty1", 0o700),  # copy-up of a directory: its listing does not change
    ("rename", "only0/f", "only1/f", RENAME_EXCHANGE),
    ("rename", "only0", "empty1"),  # over an empty lower directory
    ("rmdir", "only1"),
    ("rename", "c.txt", "dir-renamed/c.txt"),
    ("write", "dir-renamed/new", b"n"),
    ("rmtree", "dir-renamed"),
]


@pytest.mark.kernel
def test_cached_listings_follow_every_change_as_the_kernel_shows_them(
        make_twin: object) -> None:
    twin: Twin = make_twin(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)  # type: ignore[operator]
    twin.assert_same_view("at the start")
    for step in CHANGES:
        twin.assert_same_view(f"before {step}")  # fills the caches
        twin.apply([step])  # compares outcomes, then every listing
    twin.remount_and_compare()


@pytest.mark.kernel
def test_a_directory_held_open_sees_changes_after_rewinddir(make_twin: object) -> None:
    twin: Twin = make_twin(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)  # type: ignore[operator]
    streams = {label: DirStream(side.mnt / "dir")
               for label, side in zip(twin.labels, (twin.reference, twin.subject), strict=True)}
    try:
        def listed() -> dict[str, list[str]]:
            out = {}
            for label, stream in streams.items():
                stream.rewind()
                out[label] = sorted(n for n in stream.read_all() if n not in (".", ".."))
            return out

        before = listed()
        assert before["kernel"] == before["cowfs"]
        twin.apply([("unlink", "dir/x"), ("create", "dir/new"), ("rename", "dir/y", "dir/y2")])
        after = listed()
        assert after["kernel"] == after["cowfs"]
        assert "new" in after["cowfs"]
        assert "x" not in after["cowfs"]
    finally:
        for stream in streams.values():
            stream.close()


def test_inode_numbers_in_a_listing_match_stat(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """A plain listing (the kernel asks without attributes after its first batch, when nothing
    in the directory was looked up) numbers entries without looking them up: the numbers must
    still be those stat shows, for lower, upper, copied-up and merged entries."""
    lower: dict[str, object] = {f"big/f{i:03}": None for i in range(300)}
    lower |= {f"big/d{i:02}/x": None for i in range(20)}
    upper: dict[str, object] = {f"big/u{i:02}": None for i in range(20)}
    layer_set = layers(lower, upper=upper)
    mount = mount_cowfs(layer_set)
    big = mount.mnt / "big"
    os.chmod(big / "f007", 0o600)  # copied up: numbered by its origin
    os.unlink(big / "f008")
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=False)
    with os.scandir(big) as it:
        listed = {e.name: e.inode() for e in it}
    assert "f008" not in listed
    assert len(listed) == 300 - 1 + 20 + 20
    for name, ino in listed.items():
        assert os.lstat(big / name).st_ino == ino, name


def test_a_listing_after_the_names_were_looked_up_numbers_them_as_stat_does(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    """The kernel lists with attributes (readdirplus) a directory whose names were looked up:
    ``git status`` lists every directory after an ``lstat`` of its files. Names whose objects
    the kernel holds under them get entries without an inode (the kernel keeps what it has): the
    numbers listed must be those stat shows, and stat must show the same before and after, for
    lower, upper and copied-up entries (one copied up between the lookups and the listing)."""
    lower: dict[str, object] = {f"big/f{i:03}": None for i in range(200)}
    upper: dict[str, object] = {f"big/u{i:02}": None for i in range(20)}
    layer_set = layers(lower, upper=upper)
    mount = mount_cowfs(layer_set)
    big = mount.mnt / "big"
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=False)
    before = {name: os.lstat(big / name) for name in sorted(os.listdir(layer_set.lowers[0] / "big"))
              + [f"u{i:02}" for i in range(20)]}
    os.chmod(big / "f007", 0o600)  # copied up after its lookup
    with os.scandir(big) as it:
        listed = {e.name: e.inode() for e in it}
    assert listed == {name: st.st_ino for name, st in before.items()}
    for name, st in before.items():
        now = os.lstat(big / name)
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_ino, st.st_size,
                                                               st.st_mtime_ns), name
    assert stat.S_IMODE(os.lstat(big / "f007").st_mode) == 0o600
