"""Name lookup through the layer stack on a real mount: the topmost layer wins, directories merge
unless the higher one is opaque, non-directories hide everything below, whiteouts hide (in both
the kernel's character-device form and cowfs's xattr form), and lower layers may use the kernel's
trusted.overlay.* spelling."""

from __future__ import annotations

import os
import stat

import pytest
from conftest import LayerFactory, MountFactory
from support import (
    OPAQUE_TRUSTED,
    OPAQUE_USER,
    CowfsMount,
    Dir,
    File,
    Whiteout,
    run_step,
)


def read(mount: CowfsMount, rel: str) -> str:
    return (mount.mnt / rel).read_text()


def names(mount: CowfsMount, rel: str = ".") -> list[str]:
    return sorted(os.listdir(mount.mnt / rel))


@pytest.mark.layers({"f": None, "g": None}, {"f": None, "g": None, "h": None}, upper={"f": None})
def test_topmost_layer_serves_each_name(cowfs: CowfsMount) -> None:
    assert read(cowfs, "f") == "upper:f"
    assert read(cowfs, "g") == "lower0:g"
    assert read(cowfs, "h") == "lower1:h"


@pytest.mark.layers(
    {"d/a": None, "d/s/1": None},
    {"d/a": None, "d/b": None, "d/s/2": None},
    {"d/a": None, "d/b": None, "d/c": None, "d/s/3": None, "d/t/4": None},
    upper={"d/u": None, "d/s/0": None},
)
def test_directories_merge_across_every_layer(cowfs: CowfsMount) -> None:
    assert names(cowfs, "d") == ["a", "b", "c", "s", "t", "u"]
    assert names(cowfs, "d/s") == ["0", "1", "2", "3"]
    assert [read(cowfs, f"d/{n}") for n in "abcu"] == [
        "lower0:d/a",
        "lower1:d/b",
        "lower2:d/c",
        "upper:d/u",
    ]
    assert read(cowfs, "d/t/4") == "lower2:d/t/4"


@pytest.mark.layers({"x": None}, {"x/child": None, "x/sub/": None})
def test_non_directory_hides_the_directory_below(cowfs: CowfsMount) -> None:
    assert stat.S_ISREG(os.lstat(cowfs.mnt / "x").st_mode)
    assert read(cowfs, "x") == "lower0:x"
    assert run_step(cowfs.mnt, ("stat", "x/child")) == "ENOTDIR"


@pytest.mark.layers({"x/a": None}, {"x": None})
def test_directory_hides_the_non_directory_below(cowfs: CowfsMount) -> None:
    assert stat.S_ISDIR(os.lstat(cowfs.mnt / "x").st_mode)
    assert names(cowfs, "x") == ["a"]


@pytest.mark.layers({"x@": "target"}, {"x/a": None, "target": None})
def test_symlink_hides_the_directory_below(cowfs: CowfsMount) -> None:
    assert os.readlink(cowfs.mnt / "x") == "target"
    assert read(cowfs, "x") == "lower1:target"


@pytest.mark.layers(
    {"d/a": None}, {"d/b": None}, upper={"d/": Dir(xattrs=OPAQUE_USER), "d/u": None}
)
def test_opaque_upper_directory_hides_the_lowers(cowfs: CowfsMount) -> None:
    assert names(cowfs, "d") == ["u"]
    assert run_step(cowfs.mnt, ("read", "d/a")) == "ENOENT"


@pytest.mark.parametrize("opaque", [OPAQUE_USER, OPAQUE_TRUSTED], ids=["user", "trusted"])
def test_opaque_lower_directory_hides_the_layers_below_it(
    layers: LayerFactory, mount_cowfs: MountFactory, opaque: dict[str, bytes]
) -> None:
    mount = mount_cowfs(
        layers(
            {"d/b": None},
            {"d/": Dir(xattrs=opaque), "d/a": None},
            {"d/c": None, "d/a": None},
        )
    )
    assert names(mount, "d") == ["a", "b"]
    assert read(mount, "d/a") == "lower1:d/a"
    assert run_step(mount.mnt, ("stat", "d/c")) == "ENOENT"


@pytest.mark.layers(
    {"gone": Whiteout("chardev"), "d/gone": Whiteout("chardev"), "d/kept": None},
    {"gone": None, "d/gone": None, "d/other": None, "gonedir/x": None},
    upper={"gonedir": Whiteout("chardev")},
)
def test_character_device_whiteouts_hide_what_is_below(cowfs: CowfsMount) -> None:
    assert run_step(cowfs.mnt, ("stat", "gone")) == "ENOENT"
    assert run_step(cowfs.mnt, ("stat", "d/gone")) == "ENOENT"
    assert run_step(cowfs.mnt, ("stat", "gonedir")) == "ENOENT"
    assert "gone" not in names(cowfs)
    assert "gonedir" not in names(cowfs)
    assert names(cowfs, "d") == ["kept", "other"]


@pytest.mark.layers(
    {"d/gone": Whiteout("xattr"), "d/kept": None, "top": Whiteout("xattr")},
    {"d/gone": None, "d/other": None, "top": None, "side": None},
    upper={"e/gone": Whiteout("xattr")},
)
@pytest.mark.layer_check(False, reason="the upper holds a whiteout over nothing (e/gone)")
def test_xattr_whiteouts_hide_what_is_below(cowfs: CowfsMount) -> None:
    assert run_step(cowfs.mnt, ("stat", "d/gone")) == "ENOENT"
    assert run_step(cowfs.mnt, ("stat", "top")) == "ENOENT"
    # opaque=x marks a directory that holds whiteouts; it is not opaque: the rest still merges.
    assert names(cowfs, "d") == ["kept", "other"]
    assert names(cowfs) == ["d", "e", "side"]
    assert names(cowfs, "e") == []


@pytest.mark.layers({"f": Whiteout("chardev")}, {"f": None}, upper={"f": None})
def test_a_whiteout_hides_only_the_layers_below_it(cowfs: CowfsMount) -> None:
    assert read(cowfs, "f") == "upper:f"


@pytest.mark.layers({"f": Whiteout("chardev")}, {"g": None}, {"f": None})
def test_a_whiteout_hides_every_layer_below_not_just_the_next(cowfs: CowfsMount) -> None:
    assert run_step(cowfs.mnt, ("stat", "f")) == "ENOENT"


@pytest.mark.layers(
    {"d/": Dir(mode=0o750, uid=7, gid=8, xattrs={"user.top": b"0"})},
    {"d/": Dir(mode=0o755, uid=1, gid=1, xattrs={"user.low": b"1"}), "d/x": None},
)
def test_merged_directory_shows_the_topmost_attributes(cowfs: CowfsMount) -> None:
    st = os.lstat(cowfs.mnt / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 7, 8)
    assert os.listxattr(cowfs.mnt / "d") == ["user.top"]
    assert names(cowfs, "d") == ["x"]


@pytest.mark.layers({"f": File(b"top", mode=0o600, uid=3, gid=4)}, {"f": File(b"bottom!")})
def test_file_attributes_come_from_the_layer_that_serves_it(cowfs: CowfsMount) -> None:
    st = os.lstat(cowfs.mnt / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o600, 3, 4, 3)


@pytest.mark.layers({"l@": "d/t", "abs@": "/nonexistent/x"}, {"d/t": None})
def test_symlinks_resolve_inside_the_merged_view(cowfs: CowfsMount) -> None:
    assert read(cowfs, "l") == "lower1:d/t"
    assert os.readlink(cowfs.mnt / "abs") == "/nonexistent/x"


@pytest.mark.layers({"a": None})
def test_missing_names_are_enoent(cowfs: CowfsMount) -> None:
    assert run_step(cowfs.mnt, ("stat", "missing")) == "ENOENT"
    assert run_step(cowfs.mnt, ("stat", "missing/deeper")) == "ENOENT"
    assert run_step(cowfs.mnt, ("stat", "a/deeper")) == "ENOTDIR"
