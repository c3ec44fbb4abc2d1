"""Extended attributes on a real mount: user.*, trusted.* and security.* pass through (copying up
as needed); a user's own user.overlay.* names are escaped in the upper; cowfs's and the kernel's
private attributes never show; user.cowfs.* cannot be set."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import pytest
from conftest import LayerFactory, MountFactory
from support import (
    FORMAT_XATTR,
    OPAQUE_TRUSTED,
    OPAQUE_USER,
    CowfsMount,
    Dir,
    File,
    getxattr_or_none,
    injected_env,
    needs_root,
    run_step,
    wait_until,
)


def listed(mount: CowfsMount, rel: str) -> list[str]:
    return sorted(os.listxattr(mount.mnt / rel, follow_symlinks=False))


def hidden(mount: CowfsMount, rel: str, name: str) -> bool:
    """Neither listed nor readable through the mount."""
    return name not in listed(mount, rel) and run_step(mount.mnt, ("getxattr", rel, name)) == (
        "ENODATA"
    )


@pytest.mark.parametrize("rel", ["a.txt", "u.txt", "dir", "."])
@pytest.mark.parametrize("name", ["user.test", "trusted.test", "security.test"])
def test_set_get_list_remove(cowfs: CowfsMount, rel: str, name: str) -> None:
    if not name.startswith("user."):
        needs_root(f"{name.split('.')[0]}.* xattrs (CAP_SYS_ADMIN)")
    os.setxattr(cowfs.mnt / rel, name, b"value\0with nul")
    assert os.getxattr(cowfs.mnt / rel, name) == b"value\0with nul"
    assert name in listed(cowfs, rel)
    cowfs.remount()
    assert os.getxattr(cowfs.mnt / rel, name) == b"value\0with nul"
    os.removexattr(cowfs.mnt / rel, name)
    assert hidden(cowfs, rel, name)
    cowfs.remount()
    assert hidden(cowfs, rel, name)


@pytest.mark.layers({"f": File(xattrs={"user.a": b"1", "trusted.t": b"2"})})
def test_lower_xattrs_show_and_change_with_copy_up(cowfs: CowfsMount) -> None:
    assert listed(cowfs, "f") == ["trusted.t", "user.a"]
    os.setxattr(cowfs.mnt / "f", "user.a", b"changed")
    assert os.getxattr(cowfs.mnt / "f", "user.a") == b"changed"
    assert getxattr_or_none(cowfs.upper / "f", "user.a") == b"changed"
    assert getxattr_or_none(cowfs.upper / "f", "trusted.t") == b"2"


@pytest.mark.layers({"f": File(xattrs={"user.a": b"1"})})
def test_create_and_replace_flags(cowfs: CowfsMount) -> None:
    with pytest.raises(OSError) as raised:
        os.setxattr(cowfs.mnt / "f", "user.a", b"x", os.XATTR_CREATE)
    assert raised.value.errno == errno.EEXIST
    with pytest.raises(OSError) as raised:
        os.setxattr(cowfs.mnt / "f", "user.b", b"x", os.XATTR_REPLACE)
    assert raised.value.errno == errno.ENODATA
    os.setxattr(cowfs.mnt / "f", "user.a", b"r", os.XATTR_REPLACE)
    os.setxattr(cowfs.mnt / "f", "user.b", b"c", os.XATTR_CREATE)
    assert listed(cowfs, "f") == ["user.a", "user.b"]


@pytest.mark.layers({"sym@": "target", "target": None})
def test_trusted_xattr_on_a_lower_symlink(cowfs: CowfsMount) -> None:
    needs_root("trusted.* xattrs (CAP_SYS_ADMIN)")
    os.setxattr(cowfs.mnt / "sym", "trusted.s", b"1", follow_symlinks=False)
    assert os.getxattr(cowfs.mnt / "sym", "trusted.s", follow_symlinks=False) == b"1"
    assert "trusted.s" not in listed(cowfs, "target")
    assert os.readlink(cowfs.upper / "sym") == "target"


def test_removing_a_missing_xattr_is_enodata(cowfs: CowfsMount) -> None:
    assert run_step(cowfs.mnt, ("removexattr", "a.txt", "user.none")) == "ENODATA"
    assert run_step(cowfs.mnt, ("removexattr", "u.txt", "user.none")) == "ENODATA"


# --- escaping -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["a.txt", "u.txt", "dir"])
def test_user_overlay_names_are_escaped_in_the_upper(cowfs: CowfsMount, rel: str) -> None:
    os.setxattr(cowfs.mnt / rel, "user.overlay.foo", b"mine")
    assert getxattr_or_none(cowfs.upper / rel, "user.overlay.overlay.foo") == b"mine"
    assert getxattr_or_none(cowfs.upper / rel, "user.overlay.foo") is None
    assert os.getxattr(cowfs.mnt / rel, "user.overlay.foo") == b"mine"
    assert "user.overlay.foo" in listed(cowfs, rel)
    assert "user.overlay.overlay.foo" not in listed(cowfs, rel)
    cowfs.remount()
    assert os.getxattr(cowfs.mnt / rel, "user.overlay.foo") == b"mine"
    os.removexattr(cowfs.mnt / rel, "user.overlay.foo")
    assert getxattr_or_none(cowfs.upper / rel, "user.overlay.overlay.foo") is None
    assert hidden(cowfs, rel, "user.overlay.foo")


def test_a_users_opaque_and_whiteout_names_change_nothing(cowfs: CowfsMount) -> None:
    os.setxattr(cowfs.mnt / "dir", "user.overlay.opaque", b"y")
    (cowfs.mnt / "empty").write_bytes(b"")
    os.setxattr(cowfs.mnt / "empty", "user.overlay.whiteout", b"")
    os.setxattr(cowfs.mnt / ".", "user.overlay.opaque", b"x")
    cowfs.remount()
    assert sorted(os.listdir(cowfs.mnt / "dir")) == ["sub", "u", "w", "x", "y"]
    assert (cowfs.mnt / "empty").exists()
    assert os.getxattr(cowfs.mnt / "dir", "user.overlay.opaque") == b"y"
    assert os.getxattr(cowfs.mnt / "empty", "user.overlay.whiteout") == b""


@pytest.mark.layers({"f": File(xattrs={"user.overlay.overlay.bar": b"escaped"}), "d/": Dir()})
def test_escaped_names_in_a_lower_show_unescaped(cowfs: CowfsMount) -> None:
    assert listed(cowfs, "f") == ["user.overlay.bar"]
    assert os.getxattr(cowfs.mnt / "f", "user.overlay.bar") == b"escaped"


# --- private attributes -----------------------------------------------------------------------


def test_the_format_marker_is_hidden(cowfs: CowfsMount) -> None:
    assert getxattr_or_none(cowfs.upper, FORMAT_XATTR) == b"1"
    assert hidden(cowfs, ".", FORMAT_XATTR)


def test_whiteout_and_opaque_marks_are_hidden(cowfs: CowfsMount) -> None:
    os.unlink(cowfs.mnt / "dir/x")  # a 0/0 device whiteout: no mark on dir needed
    shutil.rmtree(cowfs.mnt / "deep")
    os.mkdir(cowfs.mnt / "deep")  # opaque=y
    os.setxattr(cowfs.upper / "dir", "user.overlay.opaque", b"x")  # as older cowfs wrote it
    assert getxattr_or_none(cowfs.upper / "deep", "user.overlay.opaque") == b"y"
    for rel in ("dir", "deep", "."):
        assert hidden(cowfs, rel, "user.overlay.opaque")
        assert hidden(cowfs, rel, "user.overlay.whiteout")
        assert not [n for n in listed(cowfs, rel) if n.startswith(("user.overlay.", "user.cowfs."))]
    cowfs.remount()
    for rel in ("dir", "deep", "."):
        assert hidden(cowfs, rel, "user.overlay.opaque")


@pytest.mark.layers(
    {
        "kd/": Dir(xattrs={**OPAQUE_TRUSTED, "trusted.overlay.origin": b"\0\1"}),
        "ud/": Dir(xattrs=OPAQUE_USER),
        "f": File(
            xattrs={
                "trusted.overlay.metacopy": b"",
                "user.overlay.private": b"p",
                "user.cowfs.anything": b"c",
                "user.kept": b"k",
            }
        ),
    }
)
def test_private_attributes_in_a_lower_are_hidden(cowfs: CowfsMount) -> None:
    assert hidden(cowfs, "kd", "trusted.overlay.opaque")
    assert hidden(cowfs, "kd", "trusted.overlay.origin")
    assert hidden(cowfs, "ud", "user.overlay.opaque")
    assert listed(cowfs, "f") == ["user.kept"]
    assert hidden(cowfs, "f", "user.overlay.private")
    assert hidden(cowfs, "f", "user.cowfs.anything")
    assert hidden(cowfs, "f", "trusted.overlay.metacopy")


@pytest.mark.parametrize("rel", [".", "a.txt", "u.txt", "dir"])
def test_user_cowfs_names_cannot_be_set(cowfs: CowfsMount, rel: str) -> None:
    assert run_step(cowfs.mnt, ("setxattr", rel, "user.cowfs.format", b"2")) == "EPERM"
    assert run_step(cowfs.mnt, ("setxattr", rel, "user.cowfs.other", b"x")) == "EPERM"
    assert getxattr_or_none(cowfs.upper, FORMAT_XATTR) == b"1"


# A version-2 file capability (cap_net_bind_service, permitted + effective), as setcap writes it.
FILE_CAP = bytes.fromhex("0100000200040000000000000000000000000000")

#: In the daemon: a setxattr of security.capability says it has started (``entered``) and
#: waits for ``go`` before its system call, the window in which a getxattr on the loop reads the
#: old absence.
PAUSED_CAP_SETXATTR = """
import os
import time
from pathlib import Path

from cowfs.core import realfs

_setxattr = realfs.setxattr
_dir = Path(os.environ["COWFS_TEST_PAUSE_DIR"])


def setxattr(fd, name, value, flags=0):
    if name == "security.capability":
        (_dir / "entered").touch()
        deadline = time.monotonic() + 30
        while not (_dir / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return _setxattr(fd, name, value, flags)


realfs.setxattr = setxattr
"""


def test_a_capability_set_while_its_absence_is_read_is_dropped_by_the_next_write(
        layers: LayerFactory, mount_cowfs: MountFactory, tmp_path: Path) -> None:
    """The absence of ``security.capability``, remembered so that writes need not read it,
    must not be remembered when a setxattr of one ran meanwhile: the next write would keep the
    capability (a write drops file capabilities)."""
    needs_root("security.capability")
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {**injected_env(tmp_path / "site", PAUSED_CAP_SETXATTR),
           "COWFS_TEST_PAUSE_DIR": str(pause)}
    mount = mount_cowfs(layers({}), env=env)
    path = mount.mnt / "f"
    path.write_bytes(b"1")
    with open(path, "ab") as f:
        f.write(b"2")  # the kernel asks for the capability: its absence is remembered
    setter = threading.Thread(target=os.setxattr, args=(path, "security.capability", FILE_CAP))
    setter.start()
    try:
        assert wait_until((pause / "entered").exists, timeout=30)
        with pytest.raises(OSError) as info:  # read while the setxattr is under way
            os.getxattr(path, "security.capability")
        assert info.value.errno == errno.ENODATA
    finally:
        (pause / "go").touch()
        setter.join()
    assert os.getxattr(path, "security.capability") == FILE_CAP
    with open(path, "ab") as f:
        f.write(b"3")
    assert "security.capability" not in os.listxattr(mount.upper / "f")
    assert path.read_bytes() == b"123"
