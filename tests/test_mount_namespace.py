"""Namespace changes on a real mount: unlink and rmdir leave whiteouts, mkdir over a whiteout makes
an opaque directory, rmdir of a merged directory checks every layer, renames across layers (with
RENAME_NOREPLACE and RENAME_EXCHANGE), hard links, symlinks, FIFOs, device nodes, and files that
stay usable after their last name is gone. Each result is checked again after a remount, where
the upper layer alone must carry it."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import threading

import pytest
from support import (
    OPAQUE_XATTR,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    CowfsMount,
    getxattr_or_none,
    is_whiteout,
    needs_root,
    renameat2,
    run_step,
)


def names(mount: CowfsMount, rel: str = ".") -> list[str]:
    return sorted(os.listdir(mount.mnt / rel))


def read(mount: CowfsMount, rel: str) -> str:
    return (mount.mnt / rel).read_text()


def gone(mount: CowfsMount, rel: str) -> bool:
    parent, _, name = rel.rpartition("/")
    return run_step(mount.mnt, ("stat", rel)) == "ENOENT" and name not in names(
        mount, parent or "."
    )


# --- unlink and rmdir -------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["b.txt", "a.txt", "dir/x", "link", "shadow"])
def test_unlink_of_a_lower_name_leaves_a_whiteout(cowfs: CowfsMount, rel: str) -> None:
    os.unlink(cowfs.mnt / rel)
    assert gone(cowfs, rel)
    assert is_whiteout(cowfs.upper / rel)
    cowfs.remount()
    assert gone(cowfs, rel)


def test_unlink_of_a_copied_up_file_leaves_a_whiteout(cowfs: CowfsMount) -> None:
    (cowfs.mnt / "a.txt").write_text("changed")
    os.unlink(cowfs.mnt / "a.txt")
    assert gone(cowfs, "a.txt")
    assert is_whiteout(cowfs.upper / "a.txt")
    cowfs.remount()
    assert gone(cowfs, "a.txt")


def test_unlink_of_an_upper_only_file(cowfs: CowfsMount) -> None:
    os.unlink(cowfs.mnt / "u.txt")
    assert gone(cowfs, "u.txt")
    cowfs.remount()
    assert gone(cowfs, "u.txt")


def test_rmdir_of_an_empty_lower_directory_leaves_a_whiteout(cowfs: CowfsMount) -> None:
    os.rmdir(cowfs.mnt / "empty1")
    assert gone(cowfs, "empty1")
    assert is_whiteout(cowfs.upper / "empty1")
    cowfs.remount()
    assert gone(cowfs, "empty1")


@pytest.mark.parametrize("rel", ["dir", "only1", "deep/er", "dir/sub"])
def test_rmdir_of_a_directory_with_visible_entries_is_enotempty(
    cowfs: CowfsMount, rel: str
) -> None:
    before = names(cowfs, rel)
    assert run_step(cowfs.mnt, ("rmdir", rel)) == "ENOTEMPTY"
    assert names(cowfs, rel) == before


def test_rmdir_succeeds_once_every_lower_entry_is_whited_out(cowfs: CowfsMount) -> None:
    for name in ("x", "y", "w", "u", "sub/z"):
        os.unlink(cowfs.mnt / "dir" / name)
    os.rmdir(cowfs.mnt / "dir/sub")
    assert names(cowfs, "dir") == []
    os.rmdir(cowfs.mnt / "dir")
    assert gone(cowfs, "dir")
    assert is_whiteout(cowfs.upper / "dir")
    cowfs.remount()
    assert gone(cowfs, "dir")


def test_rm_rf_of_a_merged_tree(cowfs: CowfsMount) -> None:
    shutil.rmtree(cowfs.mnt / "deep")
    shutil.rmtree(cowfs.mnt / "dir")
    assert gone(cowfs, "deep")
    assert gone(cowfs, "dir")
    cowfs.remount()
    assert gone(cowfs, "deep")
    assert gone(cowfs, "dir")


# --- creating over whiteouts --------------------------------------------------------------------


def test_mkdir_over_a_whiteout_makes_an_opaque_directory(cowfs: CowfsMount) -> None:
    shutil.rmtree(cowfs.mnt / "dir")
    os.mkdir(cowfs.mnt / "dir")
    assert names(cowfs, "dir") == []
    assert getxattr_or_none(cowfs.upper / "dir", OPAQUE_XATTR) == b"y"
    (cowfs.mnt / "dir" / "x").write_text("new x")
    cowfs.remount()
    assert names(cowfs, "dir") == ["x"]
    assert read(cowfs, "dir/x") == "new x"
    assert OPAQUE_XATTR not in os.listxattr(cowfs.mnt / "dir")


def test_mkdir_over_a_whiteout_of_a_file(cowfs: CowfsMount) -> None:
    os.unlink(cowfs.mnt / "shadow")  # a lower0 file over a lower1 directory
    os.mkdir(cowfs.mnt / "shadow")
    assert names(cowfs, "shadow") == []
    cowfs.remount()
    assert names(cowfs, "shadow") == []


@pytest.mark.parametrize("rel", ["b.txt", "dir/x"])
def test_a_file_created_over_a_whiteout_replaces_it(cowfs: CowfsMount, rel: str) -> None:
    os.unlink(cowfs.mnt / rel)
    (cowfs.mnt / rel).write_text("reborn")
    assert read(cowfs, rel) == "reborn"
    assert not is_whiteout(cowfs.upper / rel)
    cowfs.remount()
    assert read(cowfs, rel) == "reborn"


def test_a_symlink_created_over_a_whiteout_replaces_it(cowfs: CowfsMount) -> None:
    os.unlink(cowfs.mnt / "b.txt")
    os.symlink("a.txt", cowfs.mnt / "b.txt")
    assert os.readlink(cowfs.mnt / "b.txt") == "a.txt"
    cowfs.remount()
    assert read(cowfs, "b.txt") == "lower0:a.txt"


# --- rename ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("b.txt", "b2.txt"),  # lower1 file, same directory
        ("a.txt", "dir/a.txt"),  # lower0 file, into a merged directory
        ("dir/x", "only0/x"),  # between directories of different layers
        ("u.txt", "dir/u2"),  # upper-only file
        ("link", "link2"),  # lower symlink
    ],
)
def test_rename_of_a_file_to_a_new_name(cowfs: CowfsMount, src: str, dst: str) -> None:
    content = (cowfs.mnt / src).read_bytes()
    os.rename(cowfs.mnt / src, cowfs.mnt / dst)
    assert gone(cowfs, src)
    assert (cowfs.mnt / dst).read_bytes() == content
    cowfs.remount()
    assert gone(cowfs, src)
    assert (cowfs.mnt / dst).read_bytes() == content


@pytest.mark.parametrize(
    ("src", "dst"), [("b.txt", "a.txt"), ("dir/x", "dir/y"), ("u.txt", "c.txt"), ("c.txt", "u.txt")]
)
def test_rename_over_an_existing_file(cowfs: CowfsMount, src: str, dst: str) -> None:
    content = read(cowfs, src)
    os.rename(cowfs.mnt / src, cowfs.mnt / dst)
    assert gone(cowfs, src)
    assert read(cowfs, dst) == content
    cowfs.remount()
    assert gone(cowfs, src)
    assert read(cowfs, dst) == content


def test_rename_onto_a_whited_out_name(cowfs: CowfsMount) -> None:
    os.unlink(cowfs.mnt / "b.txt")
    os.rename(cowfs.mnt / "c.txt", cowfs.mnt / "b.txt")
    assert read(cowfs, "b.txt") == "lower0:c.txt"
    assert gone(cowfs, "c.txt")
    cowfs.remount()
    assert read(cowfs, "b.txt") == "lower0:c.txt"
    assert gone(cowfs, "c.txt")


def test_rename_noreplace_refuses_an_existing_target(cowfs: CowfsMount) -> None:
    for target in ("a.txt", "u.txt", "dir"):
        with pytest.raises(OSError) as raised:
            renameat2(cowfs.mnt / "b.txt", cowfs.mnt / target, RENAME_NOREPLACE)
        assert raised.value.errno == errno.EEXIST
    assert read(cowfs, "b.txt") == "lower1:b.txt"
    assert read(cowfs, "a.txt") == "lower0:a.txt"


def test_rename_noreplace_to_a_free_name(cowfs: CowfsMount) -> None:
    os.unlink(cowfs.mnt / "a.txt")
    renameat2(cowfs.mnt / "b.txt", cowfs.mnt / "a.txt", RENAME_NOREPLACE)  # whited out: free
    renameat2(cowfs.mnt / "c.txt", cowfs.mnt / "new.txt", RENAME_NOREPLACE)
    assert read(cowfs, "a.txt") == "lower1:b.txt"
    assert read(cowfs, "new.txt") == "lower0:c.txt"
    assert gone(cowfs, "b.txt")
    cowfs.remount()
    assert read(cowfs, "a.txt") == "lower1:b.txt"
    assert gone(cowfs, "b.txt")
    assert gone(cowfs, "c.txt")


@pytest.mark.parametrize(
    ("one", "other"),
    [("a.txt", "b.txt"), ("u.txt", "dir/x"), ("dir/u", "dir/w"), ("c.txt", "link")],
)
def test_rename_exchange_swaps_two_names(cowfs: CowfsMount, one: str, other: str) -> None:
    first, second = os.lstat(cowfs.mnt / one), os.lstat(cowfs.mnt / other)
    first_data = os.readlink(cowfs.mnt / one) if stat.S_ISLNK(first.st_mode) else read(cowfs, one)
    second_data = (
        os.readlink(cowfs.mnt / other) if stat.S_ISLNK(second.st_mode) else read(cowfs, other)
    )
    renameat2(cowfs.mnt / one, cowfs.mnt / other, RENAME_EXCHANGE)

    def check() -> None:
        for rel, data, was in ((other, first_data, first), (one, second_data, second)):
            now = os.lstat(cowfs.mnt / rel)
            assert stat.S_IFMT(now.st_mode) == stat.S_IFMT(was.st_mode), rel
            shown = os.readlink(cowfs.mnt / rel) if stat.S_ISLNK(now.st_mode) else read(cowfs, rel)
            assert shown == data, rel

    check()
    cowfs.remount()
    check()


def test_rename_exchange_of_a_file_and_a_new_directory(cowfs: CowfsMount) -> None:
    os.mkdir(cowfs.mnt / "newdir")
    (cowfs.mnt / "newdir/inside").write_text("in")
    renameat2(cowfs.mnt / "a.txt", cowfs.mnt / "newdir", RENAME_EXCHANGE)
    assert read(cowfs, "newdir") == "lower0:a.txt"
    assert read(cowfs, "a.txt/inside") == "in"
    cowfs.remount()
    assert read(cowfs, "newdir") == "lower0:a.txt"
    assert read(cowfs, "a.txt/inside") == "in"


def test_rename_exchange_needs_both_names(cowfs: CowfsMount) -> None:
    with pytest.raises(OSError) as raised:
        renameat2(cowfs.mnt / "a.txt", cowfs.mnt / "missing", RENAME_EXCHANGE)
    assert raised.value.errno == errno.ENOENT
    assert read(cowfs, "a.txt") == "lower0:a.txt"


def test_rename_of_a_directory_made_in_the_upper(cowfs: CowfsMount) -> None:
    os.makedirs(cowfs.mnt / "fresh/inner")
    (cowfs.mnt / "fresh/inner/f").write_text("f")
    os.rename(cowfs.mnt / "fresh", cowfs.mnt / "dir/moved")
    assert read(cowfs, "dir/moved/inner/f") == "f"
    assert gone(cowfs, "fresh")
    cowfs.remount()
    assert read(cowfs, "dir/moved/inner/f") == "f"
    assert gone(cowfs, "fresh")


def test_rename_of_a_directory_with_lower_content_moves_it(cowfs: CowfsMount) -> None:
    """With redirects (the kernel's redirect_dir=on), a merged directory moves whole: no EXDEV."""
    before = names(cowfs, "dir")
    assert run_step(cowfs.mnt, ("rename", "dir", "dir2")) == "ok"
    for when in ("now", "after remount"):
        if when == "after remount":
            cowfs.remount()
        assert gone(cowfs, "dir"), when
        assert names(cowfs, "dir2") == before, when
        assert read(cowfs, "dir2/x") == "lower1:dir/x", when


# --- links and special files --------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["b.txt", "u.txt", "dir/x"])
def test_hard_link_shares_one_inode(cowfs: CowfsMount, rel: str) -> None:
    os.link(cowfs.mnt / rel, cowfs.mnt / "dir/hard")

    def check() -> None:
        first, second = os.lstat(cowfs.mnt / rel), os.lstat(cowfs.mnt / "dir/hard")
        assert first.st_ino == second.st_ino
        assert first.st_nlink == second.st_nlink == 2

    check()
    with open(cowfs.mnt / "dir/hard", "a") as f:
        f.write("+via hard")
    assert read(cowfs, rel).endswith("+via hard")
    cowfs.remount()
    check()
    os.unlink(cowfs.mnt / rel)
    assert os.lstat(cowfs.mnt / "dir/hard").st_nlink == 1
    assert read(cowfs, "dir/hard").endswith("+via hard")


def test_hard_link_of_a_new_file(cowfs: CowfsMount) -> None:
    (cowfs.mnt / "n").write_text("n")
    os.link(cowfs.mnt / "n", cowfs.mnt / "n2")
    os.link(cowfs.mnt / "n", cowfs.mnt / "dir/n3")
    assert {os.lstat(cowfs.mnt / p).st_nlink for p in ("n", "n2", "dir/n3")} == {3}
    assert len({os.lstat(cowfs.mnt / p).st_ino for p in ("n", "n2", "dir/n3")}) == 1


def test_symlinks(cowfs: CowfsMount) -> None:
    os.symlink("dir/x", cowfs.mnt / "to_x")
    os.symlink("nowhere", cowfs.mnt / "dangling")
    os.symlink("dir", cowfs.mnt / "to_dir")
    assert stat.S_ISLNK(os.lstat(cowfs.mnt / "to_x").st_mode)
    assert read(cowfs, "to_x") == "lower1:dir/x"
    assert run_step(cowfs.mnt, ("read", "dangling")) == "ENOENT"
    assert read(cowfs, "to_dir/y") == "lower0:dir/y"
    cowfs.remount()
    assert os.readlink(cowfs.mnt / "to_x") == "dir/x"
    assert os.readlink(cowfs.mnt / "dangling") == "nowhere"
    assert os.readlink(cowfs.upper / "to_dir") == "dir"


def test_fifo_passes_data(cowfs: CowfsMount) -> None:
    os.mkfifo(cowfs.mnt / "pipe", 0o600)
    assert stat.S_ISFIFO(os.lstat(cowfs.mnt / "pipe").st_mode)
    received: list[bytes] = []

    def reader() -> None:
        with open(cowfs.mnt / "pipe", "rb") as f:
            received.append(f.read())

    thread = threading.Thread(target=reader)
    thread.start()
    with open(cowfs.mnt / "pipe", "wb") as f:
        f.write(b"through the pipe")
    thread.join(timeout=30)
    assert received == [b"through the pipe"]
    cowfs.remount()
    assert stat.S_ISFIFO(os.lstat(cowfs.mnt / "pipe").st_mode)


def test_a_whiteout_device_cannot_be_made_through_the_mount(cowfs: CowfsMount) -> None:
    with pytest.raises(PermissionError):
        os.mknod(cowfs.mnt / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    assert not os.path.lexists(cowfs.mnt / "wh")
    assert not os.path.lexists(cowfs.upper / "wh")


def test_device_nodes(cowfs: CowfsMount) -> None:
    needs_root("mknod of a device (CAP_MKNOD)")
    os.mknod(cowfs.mnt / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(cowfs.mnt / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    null = os.lstat(cowfs.mnt / "null")
    assert stat.S_ISCHR(null.st_mode)
    assert null.st_rdev == os.makedev(1, 3)
    # Not opened: a FUSE mount may be nodev, which the layer format has nothing to do with.
    assert os.lstat(cowfs.mnt / "blk").st_rdev == os.makedev(7, 200)
    cowfs.remount()
    assert stat.S_ISBLK(os.lstat(cowfs.mnt / "blk").st_mode)
    assert os.lstat(cowfs.mnt / "null").st_rdev == os.makedev(1, 3)


# --- unlinked but open ------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["b.txt", "u.txt", "new"])
def test_an_unlinked_open_file_stays_usable(cowfs: CowfsMount, rel: str) -> None:
    path = cowfs.mnt / rel
    if rel == "new":
        path.write_text("made through the mount")
    original = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        os.unlink(path)
        assert gone(cowfs, rel)
        assert os.pread(fd, 1000, 0) == original
        os.pwrite(fd, b"WRITTEN", 0)
        assert os.pread(fd, 7, 0) == b"WRITTEN"
        assert os.fstat(fd).st_nlink == 0
        os.fsync(fd)
    finally:
        os.close(fd)
    assert gone(cowfs, rel)


def test_an_unlinked_file_open_for_reading_stays_readable(cowfs: CowfsMount) -> None:
    with open(cowfs.mnt / "dir/x", "rb") as f:
        os.unlink(cowfs.mnt / "dir/x")
        assert f.read() == b"lower1:dir/x"
    assert gone(cowfs, "dir/x")


def test_a_file_renamed_over_while_open_keeps_its_data(cowfs: CowfsMount) -> None:
    with open(cowfs.mnt / "a.txt", "r+b") as f:
        os.rename(cowfs.mnt / "b.txt", cowfs.mnt / "a.txt")
        assert f.read() == b"lower0:a.txt"
        f.write(b"!")
        f.flush()
    assert read(cowfs, "a.txt") == "lower1:b.txt"


@pytest.mark.layers({"x": None, "y": None}, options=("writeback",))
def test_with_the_writeback_cache_a_lower_file_unlinked_while_open_closes_cleanly(
        cowfs: CowfsMount) -> None:
    """With the writeback cache the kernel sends the file's times at close, also of a lower file
    unlinked while open for reading: an object with no name and no upper copy, which cowfs cannot
    copy up. Its times are its open handles' business alone: the close succeeds (it failed EIO),
    and nothing reaches the upper."""
    fd = os.open(cowfs.mnt / "x", os.O_RDONLY)
    try:
        os.unlink(cowfs.mnt / "x")
        assert os.pread(fd, 100, 0) == b"lower0:x"
        os.fstat(fd)
    finally:
        os.close(fd)
    assert gone(cowfs, "x")
    assert sorted(os.listdir(cowfs.mnt)) == ["y"]
    fd = os.open(cowfs.mnt / "y", os.O_RDONLY)
    os.unlink(cowfs.mnt / "y")
    os.utime(fd, ns=(1_000_000_000, 2_000_000_000))  # times of the nameless object: kept
    os.close(fd)
