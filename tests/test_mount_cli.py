"""The cowfs command line on real mounts: help and version, background and foreground mounting,
``cowfs umount``, the ``mount -t fuse.cowfs`` helper, mount options, and bad input (refused with
one line on stderr, no traceback, nothing mounted, layers untouched)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import DEFAULT_LOWERS, DEFAULT_UPPER, LayerFactory, LayerSet, MountFactory
from support import (
    DEFAULT_WORK_NAME,
    CowfsMount,
    build_layer,
    cowfs_mount,
    fuse_device_holders,
    mount_table,
    mounted_fstype,
    needs_root,
    process_gone,
    run_step,
    run_steps_as,
    scratch_mount,
    tree_state,
    unmount,
    wait_until,
)

MOUNT_HELPER = Path("/usr/sbin/mount.fuse.cowfs")


def run(cmd: list[str], timeout: float = 60) -> tuple[int, str, str]:
    """Run a command with its output in files, not pipes: a daemon that keeps an inherited pipe
    open must not make the test hang."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        status = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout, check=False
        ).returncode
        out.seek(0)
        err.seek(0)
        return status, out.read().decode(errors="replace"), err.read().decode(errors="replace")


# --- help and version -------------------------------------------------------------------------


def test_version_names_the_installed_version(cowfs_cmd: Path) -> None:
    status, out, err = run([str(cowfs_cmd), "--version"])
    assert status == 0, err
    assert importlib.metadata.version("cowfs-overlay") in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--help"], ["mount", "umount"]),
        (["mount", "--help"], ["--foreground", "--work", "-o"]),
        (["umount", "--help"], ["umount"]),
    ],
    ids=["top", "mount", "umount"],
)
def test_help(cowfs_cmd: Path, args: list[str], expected: list[str]) -> None:
    status, out, err = run([str(cowfs_cmd), *args])
    assert status == 0, err
    for word in expected:
        assert word in out, f"{word!r} missing from {' '.join(args)} output:\n{out}"


# --- mounting and unmounting ------------------------------------------------------------------


def test_background_mount_returns_mounted_and_umount_waits_for_the_daemon(
    layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    layer_set = layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)
    # start() asserts that the filesystem is mounted as soon as `cowfs mount` has returned.
    mount = mount_cowfs(layer_set, foreground=False)
    assert mount.daemon_pids, "no new process holds /dev/fuse: where is the daemon?"
    assert (mount.mnt / "a.txt").read_text() == "lower0:a.txt"
    assert (mount.mnt / "b.txt").read_text() == "lower1:b.txt"
    # stop() runs `cowfs umount` and asserts that the daemon is gone when it returns.
    mount.stop()
    assert mounted_fstype(mount.mnt) is None


def test_cowfs_umount_ends_a_foreground_mount(cowfs: CowfsMount, cowfs_cmd: Path) -> None:
    assert cowfs.proc is not None
    status, _, err = run([str(cowfs_cmd), "umount", str(cowfs.mnt)])
    assert status == 0, err
    assert "Traceback" not in err
    assert mounted_fstype(cowfs.mnt) is None
    # `cowfs umount` waits for the daemon: it has exited by now, with status 0.
    assert cowfs.proc.poll() == 0


def test_default_work_dir_is_created_in_the_upper(cowfs: CowfsMount) -> None:
    assert (cowfs.upper / DEFAULT_WORK_NAME).is_dir()


def test_filesystem_type_is_fuse_cowfs(cowfs: CowfsMount) -> None:
    assert mounted_fstype(cowfs.mnt) == "fuse.cowfs"


def test_mount_over_the_lower_dir_itself(layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    layer_set = layers({"a.txt": None, "d/x": None})
    base = layer_set.lowers[0]
    mount = mount_cowfs(layer_set, mnt=base)
    assert (base / "a.txt").read_text() == "lower0:a.txt"
    (base / "new").write_text("new")
    with open(base / "a.txt", "a") as f:
        f.write("+more")
    assert (base / "a.txt").read_text() == "lower0:a.txt+more"
    mount.stop()
    assert (base / "a.txt").read_text() == "lower0:a.txt"
    assert not (base / "new").exists()
    assert (layer_set.upper / "new").read_text() == "new"
    assert (layer_set.upper / "a.txt").read_text() == "lower0:a.txt+more"


@pytest.fixture
def tmpfs_base(tmp_path: Path) -> Iterator[Path]:
    """A base dir that is itself a mount point. Requested before mount_cowfs, so that it is
    still mounted when that fixture's teardown compares the lower layer."""
    base = tmp_path / "tmpfs-base"
    base.mkdir()
    with scratch_mount("tmpfs", base):
        build_layer(base, {"a.txt": None, "d/x": None}, "lower0")
        yield base


def test_mount_over_a_base_dir_that_is_a_mount_point(
    tmpfs_base: Path, layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    layer_set = layers()
    mount_cowfs(layer_set, lowers=[tmpfs_base], mnt=tmpfs_base)
    assert mounted_fstype(tmpfs_base) == "fuse.cowfs"
    assert (tmpfs_base / "d/x").read_text() == "lower0:d/x"
    (tmpfs_base / "d/x").write_text("changed")
    assert (layer_set.upper / "d/x").read_text() == "changed"


@pytest.mark.parametrize("options", [("debug",), ("timeout=0",), ("timeout=5",)], ids=str)
def test_mount_options_are_accepted(
    layers: LayerFactory, mount_cowfs: MountFactory, options: tuple[str, ...]
) -> None:
    mount = mount_cowfs(layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER), options=options)
    (mount.mnt / "dir" / "x").write_text("changed")
    assert (mount.mnt / "dir" / "x").read_text() == "changed"
    assert (mount.upper / "dir" / "x").read_text() == "changed"


@pytest.mark.layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER, options=("ro",))
@pytest.mark.parametrize(
    "step",
    [
        ("write", "a.txt", b"x"),
        ("pwrite", "u.txt", 0, b"x"),
        ("create", "new"),
        ("mkdir", "newdir"),
        ("unlink", "b.txt"),
        ("rmdir", "empty1"),
        ("rename", "a.txt", "z.txt"),
        ("chmod", "a.txt", 0o600),
        ("setxattr", "a.txt", "user.x", b"1"),
        ("symlink", "a.txt", "newlink"),
        ("truncate", "u.txt", 0),
    ],
    ids=lambda step: step[0],
)
def test_read_only_mount_refuses_writes(cowfs: CowfsMount, step: tuple) -> None:
    upper_before = tree_state(cowfs.upper, skip=[DEFAULT_WORK_NAME])
    assert run_step(cowfs.mnt, step) == "EROFS"
    assert (cowfs.mnt / "a.txt").read_text() == "lower0:a.txt"
    assert tree_state(cowfs.upper, skip=[DEFAULT_WORK_NAME]) == upper_before


def test_allow_other_lets_other_users_in(layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    mount = mount_cowfs(layers({"a.txt": None}, public=True), options=("allow_other",))
    assert run_steps_as(65534, 65534, mount.mnt, [("read", "a.txt")]) == [b"lower0:a.txt"]


def test_without_allow_other_other_users_are_kept_out(
    layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    mount = mount_cowfs(layers({"a.txt": None}, public=True))
    assert run_steps_as(65534, 65534, mount.mnt, [("read", "a.txt")]) == ["EACCES"]
    assert (mount.mnt / "a.txt").read_text() == "lower0:a.txt"


# --- the mount(8) helper ----------------------------------------------------------------------


@pytest.mark.parametrize("kernel_names", [
    ",nometacopy", ",default_permissions,index=on,redirect_dir=on,userxattr,metacopy=on,xino=auto"],
    ids=["cowfs-options", "kernel-overlay-options"])
def test_mount_t_fuse_cowfs(layers: LayerFactory, kernel_names: str) -> None:
    """Also with the kernel overlay's option names, as an fstab line converted from ``overlay``
    keeps them (issue 21: they were refused)."""
    needs_root("mount -t fuse.cowfs (mount(8) lets a plain user mount only what fstab allows)")
    if not MOUNT_HELPER.exists():
        pytest.fail(f"{MOUNT_HELPER} is missing: run `make helper` (make test does it)")
    layer_set = layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)
    lowers_before = [tree_state(p) for p in layer_set.lowers]
    options = (
        f"lowerdir={':'.join(map(str, layer_set.lowers))},"
        f"upperdir={layer_set.upper},workdir={layer_set.work}{kernel_names}"
    )
    cmd = ["mount", "-t", "fuse.cowfs", "-o", options, "cowfs", str(layer_set.mnt)]
    holders_before = fuse_device_holders()
    status, out, err = run(cmd)
    daemons = fuse_device_holders() - holders_before
    try:
        assert status == 0, f"{cmd}: {err}"
        assert "Traceback" not in err + out
        assert mounted_fstype(layer_set.mnt) == "fuse.cowfs"
        assert (layer_set.mnt / "a.txt").read_text() == "lower0:a.txt"
        assert (layer_set.mnt / "dir" / "x").read_text() == "lower1:dir/x"
        (layer_set.mnt / "b.txt").write_text("written")
        assert (layer_set.upper / "b.txt").read_text() == "written"
        os.chmod(layer_set.mnt / "a.txt", 0o600)
        marked = "user.overlay.metacopy" in os.listxattr(layer_set.upper / "a.txt")
        assert marked == ("nometacopy" not in kernel_names), (
            "metacopy is on unless nometacopy (metacopy=on is the kernel's name for it)")
        # The work dir given was used, so the default one was not made.
        assert not (layer_set.upper / DEFAULT_WORK_NAME).exists()
        assert daemons, "no new process holds /dev/fuse: where is the daemon?"
    finally:
        unmount_status, _, unmount_err = run(["umount", str(layer_set.mnt)])
        unmount(layer_set.mnt, fuse=True)
        exited = wait_until(lambda: all(process_gone(p) for p in daemons), 15)
        for pid in daemons:
            if not process_gone(pid):
                os.kill(pid, 9)
    assert unmount_status == 0, unmount_err
    assert exited, f"daemon {daemons} still running 15 s after umount"
    for path, before in zip(layer_set.lowers, lowers_before, strict=True):
        assert tree_state(path) == before


def mounts_at(mnt: Path) -> int:
    """How many filesystems are mounted exactly at ``mnt`` (stacked ones count each)."""
    target = os.path.join(os.path.realpath(mnt.parent), mnt.name)
    return sum(record.mount_point == target for record in mount_table())


# --- bad input --------------------------------------------------------------------------------
# Each case gets a fresh layer set and an ExitStack for scratch mounts, and returns the arguments
# of `cowfs mount` plus the directories that must come out unchanged.

Case = Callable[[LayerSet, contextlib.ExitStack], tuple[list[str], list[Path]]]


def _standard(ls: LayerSet) -> list[str]:
    return [":".join(map(str, ls.lowers)), str(ls.upper), str(ls.mnt)]


def case_lower_missing(ls: LayerSet, stack: contextlib.ExitStack):
    return [str(ls.root / "nonexistent"), str(ls.upper), str(ls.mnt)], [ls.upper]


def case_one_of_several_lowers_missing(ls: LayerSet, stack: contextlib.ExitStack):
    lowers = f"{ls.lowers[0]}:{ls.root / 'nonexistent'}"
    return [lowers, str(ls.upper), str(ls.mnt)], [ls.lowers[0], ls.upper]


def case_upper_missing(ls: LayerSet, stack: contextlib.ExitStack):
    return [str(ls.lowers[0]), str(ls.root / "nonexistent"), str(ls.mnt)], [ls.lowers[0]]


def case_lower_is_a_file(ls: LayerSet, stack: contextlib.ExitStack):
    return [str(ls.lowers[0] / "a.txt"), str(ls.upper), str(ls.mnt)], [ls.lowers[0], ls.upper]


def case_upper_is_a_file(ls: LayerSet, stack: contextlib.ExitStack):
    return [str(ls.lowers[0]), str(ls.lowers[0] / "a.txt"), str(ls.mnt)], [ls.lowers[0]]


def case_mountpoint_missing(ls: LayerSet, stack: contextlib.ExitStack):
    args = [str(ls.lowers[0]), str(ls.upper), str(ls.root / "nonexistent")]
    return args, [ls.lowers[0], ls.upper]


def case_upper_without_user_xattrs(ls: LayerSet, stack: contextlib.ExitStack):
    ram = ls.root / "ramfs"
    ram.mkdir()
    stack.enter_context(scratch_mount("ramfs", ram))
    upper = ram / "upper"
    upper.mkdir()
    with pytest.raises(OSError):  # the premise: ramfs has no user xattrs
        os.setxattr(upper, "user.probe", b"1")
    return [str(ls.lowers[0]), str(upper), str(ls.mnt)], [ls.lowers[0], upper]


def case_upper_inside_a_lower(ls: LayerSet, stack: contextlib.ExitStack):
    upper = ls.lowers[0] / "up"
    upper.mkdir()
    return [str(ls.lowers[0]), str(upper), str(ls.mnt)], [ls.lowers[0]]


def case_work_inside_a_lower(ls: LayerSet, stack: contextlib.ExitStack):
    work = ls.lowers[0] / "work"
    work.mkdir()
    return ["--work", str(work), *_standard(ls)], [ls.lowers[0], ls.upper]


def case_work_on_another_filesystem(ls: LayerSet, stack: contextlib.ExitStack):
    other = ls.root / "tmpfs"
    other.mkdir()
    stack.enter_context(scratch_mount("tmpfs", other))
    work = other / "work"
    work.mkdir()
    return ["--work", str(work), *_standard(ls)], [ls.lowers[0], ls.upper, other]


def case_mountpoint_already_mounted(ls: LayerSet, stack: contextlib.ExitStack):
    # Already a cowfs mount (of another upper, so that only the mount point is wrong). Mounting
    # over a mount of another kind is allowed: that is how cowfs goes over a base dir that is
    # itself a mount point.
    other_upper = ls.root / "other-upper"
    other_upper.mkdir()
    stack.enter_context(cowfs_mount(ls.lowers, other_upper, ls.mnt))
    return _standard(ls), [ls.lowers[0], ls.upper, ls.mnt]


def case_mountpoint_inside_a_lower(ls: LayerSet, stack: contextlib.ExitStack):
    # cowfs would look itself up through its own mount and wait for itself.
    inner = ls.lowers[0] / "view"
    inner.mkdir()
    return [str(ls.lowers[0]), str(ls.upper), str(inner)], [ls.lowers[0], ls.upper]


def case_upper_in_use_with_another_work_dir(ls: LayerSet, stack: contextlib.ExitStack):
    other_mnt = ls.root / "other-mnt"
    other_mnt.mkdir()
    stack.enter_context(cowfs_mount(ls.lowers, ls.upper, other_mnt))
    return ["--work", str(ls.work), *_standard(ls)], [ls.lowers[0]]


BAD_INPUT: list[Case] = [
    case_lower_missing,
    case_one_of_several_lowers_missing,
    case_upper_missing,
    case_lower_is_a_file,
    case_upper_is_a_file,
    case_mountpoint_missing,
    case_upper_without_user_xattrs,
    case_upper_inside_a_lower,
    case_work_inside_a_lower,
    case_work_on_another_filesystem,
    case_mountpoint_already_mounted,
    case_mountpoint_inside_a_lower,
    case_upper_in_use_with_another_work_dir,
]


@pytest.mark.parametrize("case", BAD_INPUT, ids=lambda c: c.__name__.removeprefix("case_"))
def test_bad_input_is_refused_with_one_line(
    layers: LayerFactory, cowfs_cmd: Path, case: Case
) -> None:
    layer_set = layers({"a.txt": None, "d/x": None})
    with contextlib.ExitStack() as stack:
        args, unchanged = case(layer_set, stack)
        # Times are left out for the upper-side dirs: only what is in them must not change.
        before = {p: tree_state(p, times=p in layer_set.lowers) for p in unchanged}
        mnt = Path(args[-1])
        mounts_before = mounts_at(mnt)
        try:
            status, out, err = run([str(cowfs_cmd), "mount", *args])
        finally:
            if mounts_at(mnt) > mounts_before:
                # fusermount3 -u takes the topmost mount: the one just made.
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
                pytest.fail(f"cowfs mounted despite bad input: {args}")
        assert status != 0, f"cowfs mount {args} succeeded"
        lines = err.strip().splitlines()
        assert len(lines) == 1, f"expected one line of error, got:\n{err}"
        assert "Traceback" not in err + out
        for path, state in before.items():
            assert tree_state(path, times=path in layer_set.lowers) == state, f"{path} changed"
