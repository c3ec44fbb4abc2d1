"""Layer metadata is untrusted input (issue 9, section 2): origins, numbers, one bad entry.

Each test plants hand-made metadata in an upper, as anyone who can write files there can, mounts
it for real, and checks that the mount neither merges unrelated objects nor fails more than the
one bad entry; then that ``cowfs check`` reports the planted value and ``--repair`` removes it.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LayerFactory, LayerSet
from support import CowfsMount, File, kernel_overlay, needs_root
from tools_support import cowfs

MountFactory = Callable[..., CowfsMount]
LOWER = {"a": File(b"lower a"), "b": File(b"lower b"), "d/": None, "d/f": File(b"lower f")}
TOO_BIG = str(1 << 64).encode()


def _origin(path: Path) -> bytes:
    return os.getxattr(path, "user.cowfs.origin", follow_symlinks=False)


def _check(layer_set: LayerSet, *args: str) -> tuple[int, str]:
    lowers = [a for p in layer_set.lowers for a in ("--lower", str(p))]
    result = cowfs("check", *args, *lowers, layer_set.upper)
    return result.status, result.out + result.err


def _assert_check_reports_and_repairs(layer_set: LayerSet, expected: list[str]) -> None:
    status, out = _check(layer_set)
    assert status == 1, out
    for text in expected:
        assert text in out, out
    status, out = _check(layer_set, "--repair", "--yes")
    assert status == 0, out
    status, out = _check(layer_set)
    assert status == 0, out


# --- origins ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["two-field", "with-path"])
@pytest.mark.parametrize("first", ["forged", "victim"])
def test_a_forged_origin_does_not_merge_two_files(
    layers: LayerFactory, mount_cowfs: MountFactory, form: str, first: str
) -> None:
    """The issue's attack: an upper file claims to be a copy of the unrelated lower file ``b``."""
    layer_set = layers(LOWER, upper={"evil": File(b"evil")})
    ino_b = os.lstat(layer_set.lowers[0] / "b").st_ino
    forged = f"1:{ino_b}" + (":/b" if form == "with-path" else "")
    os.setxattr(layer_set.upper / "evil", "user.cowfs.origin", forged.encode())
    mount = mount_cowfs(layer_set)
    order = ["evil", "b"] if first == "forged" else ["b", "evil"]
    inos = {name: os.lstat(mount.mnt / name).st_ino for name in order}
    assert inos["evil"] != inos["b"]
    assert inos["b"] == ino_b  # the lower file keeps its number
    (mount.mnt / "evil").write_bytes(b"written to evil")
    assert (mount.mnt / "b").read_bytes() == b"lower b"
    (mount.mnt / "b").write_bytes(b"written to b")
    assert (mount.mnt / "evil").read_bytes() == b"written to evil"
    assert "ignoring the origin of upper inode" in mount.output()
    mount.stop()
    _assert_check_reports_and_repairs(layer_set, ["evil: user.cowfs.origin ignored"])


@pytest.mark.layer_check(False, reason="plants an origin that names another copy's object")
def test_two_upper_files_with_one_origin_stay_two(
    layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    """Defence in depth: an origin that verifies (it names the lower file below the same name)
    copied onto a second upper file does not make the two one inode."""
    layer_set = layers(LOWER, upper={"a": File(b"upper a"), "twin": File(b"twin")})
    ino_a = os.lstat(layer_set.lowers[0] / "a").st_ino
    for name in ("a", "twin"):
        os.setxattr(layer_set.upper / name, "user.cowfs.origin", f"1:{ino_a}:/a".encode())
    mount = mount_cowfs(layer_set)
    assert os.lstat(mount.mnt / "a").st_ino == ino_a
    assert os.lstat(mount.mnt / "twin").st_ino != ino_a
    (mount.mnt / "twin").write_bytes(b"twin changed")
    assert (mount.mnt / "a").read_bytes() == b"upper a"


def test_a_redirect_to_a_visible_directory_does_not_merge_the_two(
    layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    """An upper directory redirected to a lower directory that still shows under its own name
    (no whiteout: hand-made, or a rename cut short) merges with its lower content, as redirects
    do, but stays a directory of its own."""
    layer_set = layers(LOWER, upper={"d2/": None})
    ino_d = os.lstat(layer_set.lowers[0] / "d").st_ino
    os.setxattr(layer_set.upper / "d2", "user.overlay.redirect", b"/d")
    os.setxattr(layer_set.upper / "d2", "user.cowfs.origin", f"1:{ino_d}:/d".encode())
    mount = mount_cowfs(layer_set)
    assert os.lstat(mount.mnt / "d").st_ino == ino_d
    assert os.lstat(mount.mnt / "d2").st_ino != ino_d
    assert os.listdir(mount.mnt / "d2") == ["f"]
    (mount.mnt / "d" / "new").write_bytes(b"new")
    assert os.listdir(mount.mnt / "d2") == ["f"]
    mount.stop()
    _assert_check_reports_and_repairs(layer_set, ["d2: user.cowfs.origin ignored"])


def test_origins_record_the_lower_path_and_survive_renames(
    layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    layer_set = layers(LOWER)
    lower = layer_set.lowers[0]
    mount = mount_cowfs(layer_set)
    mnt = mount.mnt
    before = {n: os.lstat(mnt / n).st_ino for n in ("a", "d/f", "d")}
    (mnt / "d" / "f").write_bytes(b"copied up")
    os.rename(mnt / "d" / "f", mnt / "moved")
    os.rename(mnt / "a", mnt / "d" / "a2")  # a lower file renamed: copied up, then moved
    os.rename(mnt / "d", mnt / "e")  # a directory with lower content: redirected
    assert _origin(layer_set.upper / "moved") == f"1:{os.lstat(lower / 'd/f').st_ino}:/d/f".encode()
    assert _origin(layer_set.upper / "e/a2") == f"1:{os.lstat(lower / 'a').st_ino}:/a".encode()
    after = {"a": "e/a2", "d/f": "moved", "d": "e"}
    for _ in range(2):
        assert {n: os.lstat(mnt / after[n]).st_ino for n in before} == before
        mount.remount()
    assert "ignoring the origin" not in mount.output()
    mount.stop()
    status, out = _check(layer_set)
    assert status == 0, out


def test_an_old_two_field_origin_is_still_honoured(
    layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    layer_set = layers(LOWER, upper={"a": File(b"copied up by an older cowfs")})
    ino_a = os.lstat(layer_set.lowers[0] / "a").st_ino
    os.setxattr(layer_set.upper / "a", "user.cowfs.origin", f"1:{ino_a}".encode())
    mount = mount_cowfs(layer_set)
    assert os.lstat(mount.mnt / "a").st_ino == ino_a
    mount.stop()
    assert _check(layer_set)[0] == 0


# --- numbers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [b"1:" + TOO_BIG, b"1:" + TOO_BIG + b":/a", TOO_BIG + b":5", b"1:-5", b"1: 5", b"0:5",
     b"1:5:/a/../b"],
)
def test_out_of_range_origins_are_ignored_and_reported(
    layers: LayerFactory, mount_cowfs: MountFactory, value: bytes
) -> None:
    layer_set = layers(LOWER, upper={"a": File(b"upper a")})
    os.setxattr(layer_set.upper / "a", "user.cowfs.origin", value)
    mount = mount_cowfs(layer_set)
    st = os.lstat(mount.mnt / "a")  # no EIO
    assert st.st_ino == os.lstat(layer_set.upper / "a").st_ino
    assert (mount.mnt / "a").read_bytes() == b"upper a"
    assert sorted(os.listdir(mount.mnt)) == ["a", "b", "d"]
    mount.stop()
    _assert_check_reports_and_repairs(layer_set, ["a: user.cowfs.origin ignored"])


@pytest.mark.parametrize("value", [TOO_BIG, str(1 << 32).encode(), b"-1", b"1 ", b"\xd9\xa3"])
def test_out_of_range_link_counts_are_ignored_and_reported(
    layers: LayerFactory, mount_cowfs: MountFactory, value: bytes
) -> None:
    """A hard-link index entry's count: the lookup works, check reports it."""
    layer_set = layers({"a": File(b"lower a")})
    os.link(layer_set.lowers[0] / "a", layer_set.lowers[0] / "b")
    mount = mount_cowfs(layer_set)
    (mount.mnt / "a").write_bytes(b"changed")  # copied up into the index
    mount.stop()
    (entry,) = (layer_set.upper / ".cowfs-work" / "index").iterdir()
    os.setxattr(entry, "user.cowfs.lowerlinks", value)
    mount.start()
    for name in ("a", "b"):
        assert os.lstat(mount.mnt / name).st_nlink < 1 << 32  # no EIO
        assert (mount.mnt / name).read_bytes() == b"changed"
    assert os.lstat(mount.mnt / "a").st_ino == os.lstat(mount.mnt / "b").st_ino
    mount.stop()
    _assert_check_reports_and_repairs(
        layer_set, [f".cowfs-work/index/{entry.name}: user.cowfs.lowerlinks ignored"])


# --- one bad entry, one failure -------------------------------------------------------------------

BAD_REDIRECT = b"/../../etc"


def _ls_l(directory: Path) -> tuple[int, list[str]]:
    """``ls -l`` of a directory: its status and each entry's first column and name."""
    result = subprocess.run(["ls", "-l", str(directory)], capture_output=True, text=True,
                            check=False, env={"LC_ALL": "C", "PATH": os.environ["PATH"]})
    lines = [line.split() for line in result.stdout.splitlines()[1:]]
    return result.returncode, sorted(f"{fields[0]} {fields[-1]}" for fields in lines)


def _rm_rf(path: Path) -> int:
    return subprocess.run(["rm", "-rf", str(path)], capture_output=True, check=False).returncode


@pytest.mark.layer_check(False, reason="plants an escaping redirect")
def test_an_entry_with_a_bad_redirect_fails_alone(
    layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    layer_set = layers(LOWER, upper={"d/ok": File(b"ok"), "d/evil/inner": File(b"inner")})
    os.setxattr(layer_set.upper / "d" / "evil", "user.overlay.redirect", BAD_REDIRECT)
    mount = mount_cowfs(layer_set)
    d = mount.mnt / "d"
    assert sorted(os.listdir(d)) == ["evil", "f", "ok"]
    entries = {e.name: e for e in os.scandir(d)}
    assert entries["evil"].is_dir(follow_symlinks=False)  # the dirent's type, without a stat
    assert entries["evil"].inode() != 0
    with pytest.raises(OSError) as exc:
        os.stat(d / "evil")
    assert exc.value.errno == errno.EIO
    status, listing = _ls_l(d)
    assert status == 1
    assert listing == ["-rw-r--r-- f", "-rw-r--r-- ok", "d????????? evil"]
    assert (d / "ok").read_bytes() == b"ok"  # the rest still works
    assert _rm_rf(d) == 1
    assert os.listdir(d) == ["evil"]
    mount.remount()
    assert os.listdir(mount.mnt / "d") == ["evil"]


def test_a_bad_entry_behaves_as_under_the_kernel(
    tmp_path: Path, layers: LayerFactory, mount_cowfs: MountFactory
) -> None:
    """The same lower layers (a root-made one with a bad ``trusted.overlay.redirect``) under the
    kernel's overlayfs and under cowfs: the same listing, ``ls -l`` and ``rm -rf`` outcome."""
    needs_root("trusted.* xattrs and the kernel's overlayfs")
    mid, bottom = tmp_path / "mid", tmp_path / "bottom"
    for rel, data in [("mid/d/ok", b"ok"), ("mid/d/evil/inner", b"i"), ("bottom/d/b", b"b")]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    os.setxattr(mid / "d" / "evil", "trusted.overlay.redirect", BAD_REDIRECT)
    outcomes = []
    ref = layers({})
    with kernel_overlay([mid, bottom], ref.upper, ref.work, ref.mnt):
        outcomes.append(_bad_entry_outcome(ref.mnt))
    mount = mount_cowfs(layers({}), lowers=[mid, bottom])
    outcomes.append(_bad_entry_outcome(mount.mnt))
    assert outcomes[0] == outcomes[1]


def _bad_entry_outcome(mnt: Path) -> tuple[object, ...]:
    d = mnt / "d"
    names = sorted(os.listdir(d))
    try:
        os.stat(d / "evil")
        stat_fails = False
    except OSError:
        stat_fails = True
    ls = _ls_l(d)
    rm = _rm_rf(d)
    return names, stat_fails, ls, rm, sorted(os.listdir(d)), sorted(os.listdir(mnt))
