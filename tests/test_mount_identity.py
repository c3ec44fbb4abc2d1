"""Directory renames, hard links and inode identity (issue 3), on real mounts.

Differential against the kernel's overlayfs with ``redirect_dir=on,index=on`` (the twin fixture's
reference), each scenario also after a remount of cowfs.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import (
    RENAME_EXCHANGE,
    CowfsMount,
    Dir,
    File,
    Twin,
    kernel_overlay,
    merged_view,
    scratch_mount,
)

TREE = {
    "a/": None,
    "a/f": None,
    "a/b/": None,
    "a/b/g": None,
    "a/b/c/": None,
    "a/b/c/h": None,
    "x/": None,
    "x/y": None,
    "top": None,
}
UPPER_PART = {"a/": None, "a/u": None}

DIR_RENAMES = {
    "merged_dir": [("rename", "a", "a2"), ("listdir", "a2"), ("read", "a2/b/c/h")],
    "lower_only_dir_into_another": [("rename", "x", "a/x2"), ("read", "a/x2/y")],
    "rename_again_and_rename_parent": [
        ("rename", "a/b", "x/b2"),
        ("rename", "x", "z"),
        ("rename", "z/b2/c", "cc"),
        ("listdir", "z/b2"),
        ("read", "cc/h"),
    ],
    "old_name_is_reusable": [
        ("rename", "a", "a2"),
        ("mkdir", "a"),
        ("listdir", "a"),
        ("write", "a/new", b"new"),
        ("listdir", "a2"),
    ],
    "rename_back": [("rename", "a", "a2"), ("rename", "a2", "a"), ("listdir", "a")],
    "rmtree_of_renamed": [("rename", "a", "a2"), ("rmtree", "a2"), ("exists", "a2")],
    "rmdir_after_emptying": [
        ("rename", "a/b/c", "c2"),
        ("unlink", "c2/h"),
        ("rmdir", "c2"),
        ("listdir", "a/b"),
    ],
    "over_an_empty_lower_dir": [
        ("unlink", "x/y"),
        ("rename", "a/b", "x"),
        ("listdir", "x"),
        ("read", "x/g"),
    ],
    "exchange_dirs": [("rename", "a", "x", RENAME_EXCHANGE), ("listdir", "a"), ("listdir", "x")],
    "write_inside_renamed": [
        ("rename", "a", "a2"),
        ("append", "a2/b/g", b"+"),
        ("read", "a2/b/g"),
        ("mkdir", "a2/b/new"),
    ],
}


@pytest.mark.parametrize("steps", DIR_RENAMES.values(), ids=DIR_RENAMES.keys())
def test_directory_renames_match_the_kernel(
    make_twin: Callable[..., Twin], steps: list[tuple[object, ...]]
) -> None:
    twin = make_twin(TREE, upper=UPPER_PART)
    outcomes = twin.apply(steps)
    assert "EXDEV" not in outcomes
    twin.remount_and_compare()


def test_directory_rename_is_constant_time(cowfs_mount_tree: Callable[..., CowfsMount]) -> None:
    """Only the renamed directory is copied up, never its tree."""
    big = {f"big/d{i}/f{j}": None for i in range(20) for j in range(20)}
    mount = cowfs_mount_tree(big)
    os.rename(mount.mnt / "big", mount.mnt / "moved")
    upper_files = [p for p in (mount.upper / "moved").rglob("*")]
    assert upper_files == []
    assert len(list((mount.mnt / "moved").rglob("f*"))) == 400
    assert os.getxattr(mount.upper / "moved", "user.overlay.redirect") == b"/big"


@pytest.mark.parametrize(
    "redirect", [b"/../../etc", b"..", b"/a/../../x", b"a/b", b"/" + b"y" * 300, b"/a//b"]
)
@pytest.mark.layer_check(False, reason="the upper holds a hostile redirect on purpose")
def test_escaping_redirects_are_refused(
    cowfs_mount_tree: Callable[..., CowfsMount], redirect: bytes
) -> None:
    mount = cowfs_mount_tree(TREE, upper={"evil/": Dir(xattrs={"user.overlay.redirect": redirect})})
    with pytest.raises(OSError, match="Input/output error") as exc:
        os.listdir(mount.mnt / "evil")
    assert exc.value.errno == errno.EIO
    assert sorted(os.listdir(mount.mnt / "a")) == ["b", "f"]  # the rest still works
    assert "refusing invalid redirect" in mount.output()


# --- hard links -------------------------------------------------------------------------------

LINKED = {"a": File(b"data"), "d/": None, "solo": None}
LINKS = {"a": ("b", "d/c")}


def add_links(lower: Path) -> None:
    for source, names in LINKS.items():
        for name in names:
            os.link(lower / source, lower / name)


@pytest.fixture
def linked_twin(layers, mount_cowfs) -> Iterator[Twin]:  # type: ignore[no-untyped-def]
    """Kernel overlay and cowfs over identical layers holding a lower hard-link set."""
    ref, sub = layers(LINKED), layers(LINKED)
    for layer_set in (ref, sub):
        add_links(layer_set.lowers[0])
    with kernel_overlay(ref.lowers, ref.upper, ref.work, ref.mnt) as kernel:
        yield Twin(kernel, mount_cowfs(sub))


def test_lower_hard_links_stay_one_file(linked_twin: Twin) -> None:
    twin = linked_twin
    twin.apply(
        [
            ("append", "a", b"+more"),
            ("read", "b"),
            ("read", "d/c"),
            ("stat", "b"),
            ("unlink", "d/c"),
            ("stat", "a"),
            ("link", "b", "e"),
            ("stat", "e"),
        ]
    )
    twin.remount_and_compare()
    for mnt in (twin.reference.mnt, twin.subject.mnt):
        st = {n: os.lstat(mnt / n) for n in ("a", "b", "e")}
        assert len({s.st_ino for s in st.values()}) == 1
        assert {s.st_nlink for s in st.values()} == {3}
    twin.apply([("append", "e", b"!"), ("read", "a"), ("rename", "b", "d/b"), ("read", "d/b")])
    twin.remount_and_compare()


# --- inode identity ---------------------------------------------------------------------------


def _inos(mnt: Path, names: list[str]) -> dict[str, int]:
    return {n: os.lstat(mnt / n).st_ino for n in names}


def test_inode_numbers_survive_copy_up_and_remount(
    cowfs_mount_tree: Callable[..., CowfsMount],
) -> None:
    mount = cowfs_mount_tree(TREE, upper=UPPER_PART)
    names = ["a", "a/f", "a/b", "a/b/g", "x", "x/y", "top", "a/u"]
    before = _inos(mount.mnt, names)
    assert len(set(before.values())) == len(names)
    (mount.mnt / "a" / "f").write_text("changed")
    os.chmod(mount.mnt / "a" / "b", 0o700)
    os.utime(mount.mnt / "x" / "y")
    os.rename(mount.mnt / "top", mount.mnt / "a" / "top2")
    assert (mount.upper / "a" / "f").exists()
    after = _inos(mount.mnt, [n if n != "top" else "a/top2" for n in names])
    assert list(after.values()) == list(before.values())
    mount.remount()
    again = _inos(mount.mnt, [n if n != "top" else "a/top2" for n in names])
    assert list(again.values()) == list(before.values())


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs, requested before the mount fixtures so that it outlives their teardown checks."""
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    with scratch_mount("tmpfs", tmpfs):
        yield tmpfs


def test_numbers_stay_unique_across_filesystems(
    tmpfs_dir: Path, cowfs_mount_tree: Callable[..., CowfsMount]
) -> None:
    """A lower on tmpfs and an upper on the root filesystem: inode numbers may coincide in the
    layers, never in the mount."""
    lower = tmpfs_dir / "lower"
    lower.mkdir()
    for i in range(50):
        (lower / f"t{i}").write_text(str(i))
    mount = cowfs_mount_tree({f"e{i}": None for i in range(50)}, extra_lower=lower)
    inos = [os.lstat(p).st_ino for p in mount.mnt.iterdir()]
    assert len(inos) == 100
    assert len(set(inos)) == 100
    (mount.mnt / "t3").write_text("copied")
    assert os.lstat(mount.mnt / "t3").st_ino in inos
    mount.remount()
    assert sorted(os.lstat(p).st_ino for p in mount.mnt.iterdir()) == sorted(inos)


def test_tools_that_rely_on_inode_numbers(cowfs_mount_tree: Callable[..., CowfsMount]) -> None:
    mount = cowfs_mount_tree(LINKED, links=True)
    mnt = mount.mnt
    (mnt / "a").write_bytes(b"x" * 100_000)  # copy-up through one name
    found = subprocess.run(["find", ".", "-samefile", "b"], cwd=mnt, capture_output=True,
                           text=True, check=True).stdout.split()
    assert sorted(found) == ["./a", "./b", "./d/c"]
    du = subprocess.run(["du", "-s", "--apparent-size", "-b", "."], cwd=mnt, capture_output=True,
                        text=True, check=True).stdout.split()[0]
    assert 100_000 <= int(du) < 120_000, "hard links are counted once"
    archive = mount.upper.parent / "t.tar"
    subprocess.run(["tar", "-cf", str(archive), "."], cwd=mnt, check=True)
    listing = subprocess.run(["tar", "-tvf", str(archive)], capture_output=True, text=True,
                             check=True).stdout
    assert listing.count("link to") == 2, listing


# --- layers made by others ----------------------------------------------------------------------


def test_a_kernel_made_layer_works_as_a_lower(
    tmp_path: Path, cowfs_mount_tree: Callable[..., CowfsMount]
) -> None:
    """The kernel (trusted xattrs, char-device whiteouts, trusted.overlay.redirect and opaque,
    as Docker and podman also write them) makes a layer; cowfs and the kernel then stack it."""
    base = tmp_path / "base"
    for rel, text in [("keep", "k"), ("gone", "g"), ("d/x", "x"), ("d/y", "y"), ("r/s/t", "t")]:
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_text(text)
    made, work, mnt = tmp_path / "made", tmp_path / "work", tmp_path / "mnt"
    for p in (made, work, mnt):
        p.mkdir()
    with kernel_overlay([base], made, work, mnt):
        os.unlink(mnt / "gone")
        os.unlink(mnt / "d" / "x")
        os.rename(mnt / "r", mnt / "r2")
        (mnt / "d2").mkdir()
        (mnt / "keep").write_text("changed")
        os.unlink(mnt / "d" / "y")
        os.rmdir(mnt / "d")
        (mnt / "d").mkdir()
        (mnt / "d" / "new").write_text("n")
    assert os.getxattr(made / "d", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(made / "r2", "trusted.overlay.redirect")
    assert os.stat(made / "gone").st_rdev == 0
    kmnt = tmp_path / "kmnt"
    kmnt.mkdir()
    with kernel_overlay([made, base], None, None, kmnt, ("redirect_dir=follow",)):
        expected = merged_view(kmnt)
    mount = cowfs_mount_tree(None, lowers=[made, base])
    assert merged_view(mount.mnt) == expected
    assert sorted(os.listdir(mount.mnt)) == ["d", "d2", "keep", "r2"]
    assert (mount.mnt / "r2" / "s" / "t").read_text() == "t"


@pytest.fixture
def cowfs_mount_tree(layers, mount_cowfs) -> Callable[..., CowfsMount]:  # type: ignore[no-untyped-def]
    """``cowfs_mount_tree(spec, upper=..., extra_lower=..., lowers=..., links=False)``: mount
    cowfs over one lower built from ``spec`` (with ``extra_lower`` below it, or instead over
    existing ``lowers``); the mount fixture checks the lowers are unchanged at teardown."""

    def start(  # type: ignore[no-untyped-def]
        spec, *, upper=None, extra_lower=None, lowers=None, links=False
    ):
        layer_set = layers(spec if spec is not None else {}, upper=upper)
        if links:
            add_links(layer_set.lowers[0])
        if lowers is None:
            lowers = [*layer_set.lowers, *([extra_lower] if extra_lower is not None else [])]
        return mount_cowfs(layer_set, lowers=lowers)

    return start
