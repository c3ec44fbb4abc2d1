"""``cowfs status`` (the mounts on this machine with their changes) and ``cowfs check`` (each
fault planted on its own, found, repaired, and found no more)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support import cowfs_mount
from tools_support import Workspace, assert_user_error, cowfs, unchanged, workspace

__all__ = ["workspace"]


def test_status_lists_a_mount_with_its_changes(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "a.txt").write_text("changed")
        (ws.mnt / "new").write_text("new")
        (ws.mnt / "b.txt").unlink()
        text = cowfs("status")
        document = json.loads(cowfs("status", "--json").out)
    assert text.status == 0
    block = text.out.split(f"{ws.mnt}  (pid ")[1].split("\n/")[0]
    assert f"lowers:  {ws.base}" in block
    assert f"upper:   {ws.upper}  (" in block
    assert "changes: 1 copied up, 1 created, 1 deleted, 0 renamed" in block
    mine = [m for m in document["mounts"] if m["mountpoint"] == str(ws.mnt)]
    assert len(mine) == 1
    assert mine[0]["state"] == "mounted"
    assert (mine[0]["copied_up"], mine[0]["created"], mine[0]["deleted"]) == (1, 1, 1)
    assert mine[0]["upper_bytes"] > 0
    assert str(ws.mnt) not in cowfs("status").out


def _leftover(ws: Workspace) -> None:
    tmp = ws.upper / ".cowfs-work/tmp"
    tmp.mkdir(parents=True)
    (tmp / "#123.4").write_text("half a copy-up")


def _unmarked_whiteout(ws: Workspace) -> None:
    (ws.upper / "dir").mkdir()
    (ws.upper / "dir/x").write_bytes(b"")
    os.setxattr(ws.upper / "dir/x", "user.overlay.whiteout", b"")


def _stray_whiteout(ws: Workspace) -> None:
    (ws.upper / "never-existed").write_bytes(b"")
    os.setxattr(ws.upper / "never-existed", "user.overlay.whiteout", b"")
    os.setxattr(ws.upper, "user.overlay.opaque", b"x")


def _escaping_redirect(ws: Workspace) -> None:
    (ws.upper / "moved").mkdir()
    os.setxattr(ws.upper / "moved", "user.overlay.redirect", b"/../../etc")


def _missing_redirect(ws: Workspace) -> None:
    (ws.upper / "moved").mkdir()
    os.setxattr(ws.upper / "moved", "user.overlay.redirect", b"/no/such/dir")


@pytest.mark.parametrize(
    ("plant", "finding", "needs_lowers"),
    [
        (_leftover, "leftover from an interrupted operation", False),
        (_unmarked_whiteout, "not marked overlay.opaque=x", False),
        (_stray_whiteout, "whiteout over nothing", True),
        (_escaping_redirect, "malformed or escaping redirect", False),
        (_missing_redirect, "redirect to a directory the lowers do not have", True),
    ],
    ids=["leftover", "unmarked-whiteout", "stray-whiteout", "escaping-redirect",
         "missing-redirect"],
)
def test_check_finds_and_repairs_each_fault(workspace: Workspace, plant, finding: str,  # type: ignore[no-untyped-def]
                                            needs_lowers: bool) -> None:
    ws = workspace
    lower = ("--lower", str(ws.base)) if needs_lowers else ()
    assert cowfs("check", *lower, ws.upper).status == 0
    plant(ws)
    with unchanged(ws.base, "the base"):
        found = cowfs("check", *lower, ws.upper)
        assert found.status == 1, found
        assert finding in found.out
        with unchanged(ws.upper, "the upper"):
            not_confirmed = cowfs("check", "--repair", *lower, ws.upper)
        assert not_confirmed.status == 1
        assert "--yes" in not_confirmed.err
        repaired = cowfs("check", "--repair", "--yes", *lower, ws.upper)
        assert repaired.status == 0, repaired
        assert "repaired 1 problem" in repaired.out
        again = cowfs("check", *lower, ws.upper)
        assert again.status == 0, again.out


def test_check_refuses_an_unknown_format_and_bad_input(workspace: Workspace,
                                                       tmp_path: Path) -> None:
    ws = workspace
    os.setxattr(ws.upper, "user.cowfs.format", b"7")
    result = cowfs("check", ws.upper)
    assert result.status == 1
    assert "format '7'" in result.out
    assert_user_error(cowfs("check", "--repair", "--yes", ws.upper), "none can be repaired")
    assert_user_error(cowfs("check", tmp_path / "missing"), "does not exist")
