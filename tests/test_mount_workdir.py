"""The work directory as untrusted input, recovery at mount, read-only mounts that write nothing.

A work directory that is a symlink, belongs to another user, is writable by others or holds a
symlinked ``tmp/`` or ``index/`` is refused before anything is deleted or created there. At a
read-write mount, leftovers in ``tmp/`` are removed, pending link counts of the hard-link index are
settled from what the upper shows, unused index entries are dropped and format-1 counts converted.
A read-only mount changes no layer at all.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import LayerFactory, LayerSet, MountFactory
from support import needs_root, tree_state

from cowfs.core import schema

WORK = schema.WORK_DIR_NAME


def mount_fails(cowfs_cmd: Path, lowers: list[Path], upper: Path, mnt: Path,
                *extra: str) -> str:
    """Run ``cowfs mount`` expecting a refusal; return its message."""
    result = subprocess.run(
        [str(cowfs_cmd), "mount", *extra, ":".join(map(str, lowers)), str(upper), str(mnt)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0, "the mount was not refused"
    assert "Traceback" not in result.stderr, result.stderr
    assert os.path.ismount(mnt) is False
    return result.stderr.strip()


def test_a_symlinked_work_directory_is_refused_and_its_target_untouched(
        layers: LayerFactory, cowfs_cmd: Path, tmp_path: Path) -> None:
    ls = layers({"a": None})
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "tmp").mkdir(mode=0o700)
    (victim / "tmp" / "precious").write_text("not cowfs's")
    (victim / "other").write_text("mine")
    (ls.upper / WORK).symlink_to(victim)
    before = tree_state(victim)
    message = mount_fails(cowfs_cmd, ls.lowers, ls.upper, ls.mnt)
    assert "symlink" in message
    assert WORK in message
    assert tree_state(victim) == before


@pytest.mark.parametrize("inner", ["tmp", "index"])
def test_a_symlinked_tmp_or_index_is_refused(layers: LayerFactory, cowfs_cmd: Path,
                                             tmp_path: Path, inner: str) -> None:
    ls = layers({"a": None})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (elsewhere / "keep").write_text("keep")
    (ls.upper / WORK).mkdir(mode=0o700)
    (ls.upper / WORK / inner).symlink_to(elsewhere)
    message = mount_fails(cowfs_cmd, ls.lowers, ls.upper, ls.mnt)
    assert "not a directory" in message
    assert (elsewhere / "keep").read_text() == "keep"


def test_a_work_directory_of_another_user_or_open_to_others_is_refused(
        layers: LayerFactory, cowfs_cmd: Path) -> None:
    needs_root("a work directory owned by another user (chown)")
    ls = layers({"a": None})
    work = ls.upper / WORK
    work.mkdir(mode=0o700)
    (work / "tmp").mkdir(mode=0o700)
    (work / "tmp" / "left").write_text("x")
    os.chown(work, 1000, 1000)
    assert "owned by uid 1000" in mount_fails(cowfs_cmd, ls.lowers, ls.upper, ls.mnt)
    os.chown(work, 0, 0)
    work.chmod(0o777)
    assert "writable by other users" in mount_fails(cowfs_cmd, ls.lowers, ls.upper, ls.mnt)
    assert (work / "tmp" / "left").read_text() == "x", "nothing is deleted before the checks"


def test_a_read_only_mount_writes_nothing(layers: LayerFactory,
                                          mount_cowfs: MountFactory) -> None:
    ls = layers({"a": None, "d/b": None}, upper={"u": None})
    before = tree_state(ls.upper)
    mount = mount_cowfs(ls, options=("ro",))
    assert (mount.mnt / "a").read_text() == "lower0:a"
    with pytest.raises(OSError) as exc:
        (mount.mnt / "new").write_text("x")
    assert exc.value.errno == 30  # EROFS
    mount.stop()
    assert not (ls.upper / WORK).exists()
    assert tree_state(ls.upper) == before
    assert schema.XATTR_FORMAT not in os.listxattr(ls.upper)


def test_a_read_only_mount_of_a_used_upper_leaves_the_work_directory_alone(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    ls = layers({"a": None})
    mount = mount_cowfs(ls)
    os.unlink(mount.mnt / "a")
    mount.stop()
    (ls.upper / WORK / "tmp" / "#1.1").write_text("leftover of a crash")
    before = tree_state(ls.upper)
    mount = mount_cowfs(ls, options=("ro",))
    assert os.listdir(mount.mnt) == []
    mount.stop()
    assert tree_state(ls.upper) == before
    (ls.upper / WORK / "tmp" / "#1.1").unlink()  # for the layer check after the test


def test_leftovers_in_tmp_are_removed_at_mount(layers: LayerFactory,
                                                mount_cowfs: MountFactory) -> None:
    ls = layers({"a": None})
    mount_cowfs(ls).stop()
    tmp = ls.upper / WORK / "tmp"
    (tmp / "#9.1").write_text("half a copy-up")
    (tmp / "#9.2").mkdir()
    (tmp / "#9.2" / "x").write_text("a removed directory")
    os.symlink("/etc/passwd", tmp / "#9.3")
    mount = mount_cowfs(ls)
    assert os.listdir(tmp) == []
    assert Path("/etc/passwd").exists()
    assert sorted(os.listdir(mount.mnt)) == ["a"]


def hard_linked_layers(layers: LayerFactory) -> LayerSet:
    """A lower holding one file under two names, ``a`` and ``b``."""
    ls = layers({"b": None, "d/": None})
    os.link(ls.lowers[0] / "b", ls.lowers[0] / "a")
    return ls


def _index_entry(ls_lower: Path) -> str:
    return schema.index_name(1, os.stat(ls_lower / "b").st_ino)


def _copy_into_index(mount_cowfs: MountFactory, ls: LayerSet) -> None:
    mount = mount_cowfs(ls)
    with open(mount.mnt / "a", "a") as f:
        f.write("+")
    assert os.stat(mount.mnt / "b").st_nlink == 2
    mount.stop()


@pytest.mark.parametrize("happened", [True, False])
def test_a_pending_link_count_is_settled_at_mount(layers: LayerFactory,
                                                  mount_cowfs: MountFactory,
                                                  happened: bool) -> None:
    """As a daemon killed between recording a count change and making it would leave it."""
    ls = hard_linked_layers(layers)
    _copy_into_index(mount_cowfs, ls)
    entry = ls.upper / WORK / "index" / _index_entry(ls.lowers[0])
    assert os.getxattr(entry, schema.XATTR_LOWER_LINKS) == b"2"
    if happened:
        os.mknod(ls.upper / "a", 0o20000, 0)  # the whiteout was made
    os.setxattr(entry, schema.XATTR_PENDING, b"1 2 present a")
    mount = mount_cowfs(ls)
    assert schema.XATTR_PENDING not in os.listxattr(entry)
    assert os.getxattr(entry, schema.XATTR_LOWER_LINKS) == (b"1" if happened else b"2")
    assert os.stat(mount.mnt / "b").st_nlink == (1 if happened else 2)
    assert (mount.mnt / "b").read_text() == "lower0:b+"
    assert os.path.exists(mount.mnt / "a") is not happened


def test_unused_index_entries_are_dropped_and_old_counts_converted(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    ls = hard_linked_layers(layers)
    _copy_into_index(mount_cowfs, ls)
    index = ls.upper / WORK / "index"
    entry = index / _index_entry(ls.lowers[0])
    os.removexattr(entry, schema.XATTR_LOWER_LINKS)
    os.setxattr(entry, schema.XATTR_NLINK, b"2")  # as cowfs 0.1 wrote it
    orphan = index / "1-999999999"
    orphan.write_text("no name uses me")
    os.setxattr(orphan, schema.XATTR_LOWER_LINKS, b"0")
    mount = mount_cowfs(ls)
    assert not orphan.exists()
    assert os.getxattr(entry, schema.XATTR_LOWER_LINKS) == b"2"
    assert schema.XATTR_NLINK not in os.listxattr(entry)
    assert os.stat(mount.mnt / "a").st_nlink == 2


def test_a_directory_renamed_over_a_whiteout_leaves_no_stray_whiteout(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    ls = layers({"x": None})
    mount = mount_cowfs(ls)
    os.unlink(mount.mnt / "x")
    os.mkdir(mount.mnt / "d")
    os.rename(mount.mnt / "d", mount.mnt / "x")
    assert sorted(os.listdir(mount.mnt)) == ["x"]
    assert sorted(os.listdir(ls.upper)) == [WORK, "x"]
    assert os.listdir(ls.upper / WORK / "tmp") == []


def test_a_noted_stray_whiteout_is_removed_at_mount(layers: LayerFactory,
                                                    mount_cowfs: MountFactory) -> None:
    """As a daemon killed between the exchange and the removal of the whiteout leaves it."""
    ls = layers({"x": None})
    mount_cowfs(ls).stop()
    (ls.upper / "sub").mkdir()
    os.mknod(ls.upper / "sub" / "d", 0o20000, 0)
    os.mknod(ls.upper / "x", 0o20000, 0)  # a whiteout that is not noted, and hides x
    (ls.upper / WORK / "tmp" / "#1.1.stray").write_text("sub/d")
    (ls.upper / WORK / "tmp" / "#1.2.stray").write_text("")  # killed while writing the note
    mount = mount_cowfs(ls)
    assert os.listdir(ls.upper / "sub") == []
    assert os.path.lexists(ls.upper / "x")
    assert os.listdir(ls.upper / WORK / "tmp") == []
    assert sorted(os.listdir(mount.mnt)) == ["sub"]
