"""Every mount option docs/cli.md lists, mounted and checked for its effect: the flags the kernel
shows in /proc/self/mountinfo, and what they change (access times, set-user-ID, device files,
execution, read-only). Also: reading through the view never changes a lower file's access time,
and ``cowfs status`` shows the flags with how to restore ``suid,dev``."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import LayerFactory, MountFactory
from support import CowfsMount, File, find_cowfs, needs_root

pytestmark = pytest.mark.timeout(120)

OLD = 1_000_000_000  # 2001: an access time well in the past, older than the mtime


def flags_of(mnt: Path) -> tuple[set[str], set[str]]:
    """The mount's own flags and its superblock's options, for the topmost mount at ``mnt``."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        if left.split()[4] == str(mnt):
            found = (set(left.split()[5].split(",")), set(right.split()[2].split(",")))
    assert found is not None, f"{mnt} is not mounted"
    return found


def status_of(mnt: Path) -> str:
    """The lines ``cowfs status`` prints for the mount at ``mnt`` (other mounts may be listed)."""
    result = subprocess.run([str(find_cowfs()), "status"], capture_output=True, text=True,
                            check=True, timeout=60)
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{mnt}  ("))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return "\n".join(block)


def age(path: Path) -> None:
    """Access time far in the past, modification time later: relatime would update it."""
    os.utime(path, ns=(OLD * 10**9, (OLD + 3600) * 10**9), follow_symlinks=False)


def mounted(layers: LayerFactory, mount_cowfs: MountFactory, *options: str) -> CowfsMount:
    layer_set = layers({"a.txt": None, "tool": File(mode=0o755, content=b"#!/bin/sh\necho ran\n"),
                        "d/x": None}, upper={"u.txt": None})
    for name in ("a.txt", "tool", "d"):
        age(layer_set.lowers[0] / name)
    age(layer_set.upper / "u.txt")
    return mount_cowfs(layer_set, options=options)


def atimes_after_reading(mount: CowfsMount) -> tuple[int, int]:
    """Read a lower and an upper file through the view; their real access times after."""
    assert (mount.mnt / "a.txt").read_text() == "lower0:a.txt"
    assert (mount.mnt / "u.txt").read_text() == "upper:u.txt"
    assert os.listdir(mount.mnt / "d") == ["x"]
    assert int(os.stat(mount.lowers[0] / "d").st_atime) == OLD, "listing changed a lower dir"
    return (int(os.stat(mount.lowers[0] / "a.txt").st_atime),
            int(os.stat(mount.upper / "u.txt").st_atime))


@pytest.mark.layer_check(False, reason="the test changes upper times on purpose (age)")
@pytest.mark.parametrize("option", ["relatime", "atime", None])
def test_relatime_is_the_default(layers: LayerFactory, mount_cowfs: MountFactory,
                                 option: str | None) -> None:
    mount = mounted(layers, mount_cowfs, *([option] if option else []))
    flags, _ = flags_of(mount.mnt)
    assert "relatime" in flags
    assert "noatime" not in flags
    lower_atime, upper_atime = atimes_after_reading(mount)
    assert lower_atime == OLD, "reading through the view changed a lower file's access time"
    assert upper_atime > OLD, "relatime: an access time older than the mtime is updated"


@pytest.mark.layer_check(False, reason="the test changes upper times on purpose (age)")
def test_noatime_changes_no_access_time(layers: LayerFactory,
                                        mount_cowfs: MountFactory) -> None:
    mount = mounted(layers, mount_cowfs, "noatime")
    flags, _ = flags_of(mount.mnt)
    assert "noatime" in flags
    assert atimes_after_reading(mount) == (OLD, OLD)
    ran = subprocess.run([str(mount.mnt / "tool")], check=True, capture_output=True, timeout=30)
    assert ran.stdout == b"ran\n"
    assert int(os.stat(mount.lowers[0] / "tool").st_atime) == OLD
    assert int(os.stat(mount.mnt / "tool").st_atime) == OLD
    assert int(os.stat(mount.mnt / "u.txt").st_atime) == OLD


@pytest.mark.layer_check(False, reason="the test changes upper times on purpose (age)")
@pytest.mark.parametrize(("options", "present", "absent"), [
    (("strictatime",), set(), {"relatime", "noatime"}),
    (("nodiratime",), {"nodiratime", "relatime"}, {"noatime"}),
    (("strictatime", "nodiratime"), {"nodiratime"}, {"relatime", "noatime"}),
    (("noatime", "relatime"), {"relatime"}, {"noatime"}),  # the last one wins, as for mount(8)
], ids=str)
def test_access_time_flags(layers: LayerFactory, mount_cowfs: MountFactory,
                           options: tuple[str, ...], present: set[str], absent: set[str]) -> None:
    if {"strictatime", "nodiratime"} & set(options):
        needs_root("strictatime and nodiratime are set with mount_setattr after mounting")
    mount = mounted(layers, mount_cowfs, *options)
    flags, _ = flags_of(mount.mnt)
    assert present <= flags, flags
    assert not absent & flags, flags
    lower_atime, _ = atimes_after_reading(mount)
    assert lower_atime == OLD


def test_strictatime_as_a_plain_user_is_refused_in_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("the refusal is for plain users")
    for name in ("b", "u", "m"):
        (tmp_path / name).mkdir()
    result = subprocess.run([str(find_cowfs()), "mount", "-o", "strictatime", *(
        str(tmp_path / n) for n in ("b", "u", "m"))], capture_output=True, text=True,
        check=False, timeout=60)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert "need root" in result.stderr, result.stderr


def test_nosuid_nodev_by_default_and_status_says_how_to_restore(
        layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    mount = mount_cowfs(layers({"a.txt": None}), foreground=False)
    flags, _ = flags_of(mount.mnt)
    assert {"nosuid", "nodev"} <= flags
    block = status_of(mount.mnt)
    assert "flags:   rw,nosuid,nodev" in block, block
    assert "-o suid,dev restores" in block, block


def test_suid_dev_restore_what_the_kernel_overlay_has(layers: LayerFactory,
                                                      mount_cowfs: MountFactory) -> None:
    needs_root("suid and dev mounts")
    mount = mount_cowfs(layers({"a.txt": None}), options=("suid", "dev"), foreground=False)
    flags, _ = flags_of(mount.mnt)
    assert not {"nosuid", "nodev"} & flags
    block = status_of(mount.mnt)
    assert "flags:   rw," in block, block
    assert "-o suid,dev restores" not in block, block


def test_nodev_keeps_device_files_closed(layers: LayerFactory,
                                         mount_cowfs: MountFactory) -> None:
    needs_root("a device node in a layer")
    layer_set = layers({"a.txt": None})
    os.mknod(layer_set.lowers[0] / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    mount = mount_cowfs(layer_set)
    with pytest.raises(PermissionError):
        (mount.mnt / "null").open("rb")


def test_noexec_and_exec(layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    layer_set = layers({"tool": File(mode=0o755, content=b"#!/bin/sh\necho ran\n")})
    mount = mount_cowfs(layer_set, options=("noexec",))
    assert "noexec" in flags_of(mount.mnt)[0]
    with pytest.raises(PermissionError):
        subprocess.run([str(mount.mnt / "tool")], check=False, timeout=30)
    mount.stop()
    other = layers({"tool": File(mode=0o755, content=b"#!/bin/sh\necho ran\n")})
    mount = mount_cowfs(other, options=("exec",))
    assert "noexec" not in flags_of(mount.mnt)[0]
    ran = subprocess.run([str(mount.mnt / "tool")], capture_output=True, text=True, check=True,
                         timeout=30)
    assert ran.stdout == "ran\n"


@pytest.mark.parametrize(("option", "shown"), [("sync", "sync"), ("dirsync", "dirsync"),
                                               ("ro", "ro")])
def test_kernel_options_reach_the_kernel(layers: LayerFactory, mount_cowfs: MountFactory,
                                         option: str, shown: str) -> None:
    mount = mount_cowfs(layers({"a.txt": None}), options=(option,))
    flags, super_options = flags_of(mount.mnt)
    assert shown in flags | super_options
    assert (mount.mnt / "a.txt").read_text() == "lower0:a.txt"
    if option != "ro":
        (mount.mnt / "a.txt").write_text("changed")
        assert (mount.upper / "a.txt").read_text() == "changed"


@pytest.mark.parametrize("option", ["defaults", "auto", "noauto", "nofail", "_netdev", "user",
                                    "users", "nouser", "owner", "group", "rw", "async"])
def test_mount8_options_are_accepted_and_ignored(layers: LayerFactory,
                                                 mount_cowfs: MountFactory, option: str) -> None:
    mount = mount_cowfs(layers({"a.txt": None}), options=(option,))
    flags, super_options = flags_of(mount.mnt)
    assert "rw" in flags
    assert "sync" not in super_options
    assert (mount.mnt / "a.txt").read_text() == "lower0:a.txt"
