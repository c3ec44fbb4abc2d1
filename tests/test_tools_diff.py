"""``cowfs diff`` and the layer walk behind every tool: golden text and JSON for a scenario made
through a real mount, a mountpoint and an upper giving the same answer (also for a mount over the
base itself), anomalies, quoting, and bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

from support import cowfs_mount
from tools_support import (
    GOLDEN_TEXT,
    Workspace,
    assert_user_error,
    cowfs,
    make_changes,
    unchanged,
    workspace,
)

from cowfs.tools.changes import quote
from cowfs.tools.walk import Added, Anomaly, Deleted, Kind, Problem, walk

__all__ = ["workspace"]  # the fixture, used by name


def test_diff_golden_text_and_json(workspace: Workspace) -> None:
    ws = workspace
    with unchanged(ws.base, "the base"):
        with cowfs_mount([ws.base], ws.upper, ws.mnt):
            make_changes(ws.mnt)
            through_mount = cowfs("diff", ws.mnt)
            as_json = cowfs("diff", "--json", ws.mnt)
        offline = cowfs("diff", "--lower", ws.base, ws.upper)
    assert through_mount.status == 0, through_mount
    assert through_mount.out == GOLDEN_TEXT
    assert through_mount.err == ""
    assert offline.out == GOLDEN_TEXT
    document = json.loads(as_json.out)
    assert document["summary"] == {"added": 7, "modified": 1, "metadata": 2, "deleted": 2,
                                   "replaced": 2, "renamed": 1}
    by_path = {c["path"]: c for c in document["changes"]}
    assert by_path["renamed"] == {"change": "renamed", "path": "renamed", "kind": "dir",
                                  "from": "old", "metadata": False}
    assert by_path["kind"] == {"change": "replaced", "path": "kind", "kind": "dir",
                               "was": "file"}
    assert by_path["newdir/nested/hardlink"]["hardlink_of"] == "new.txt"
    assert by_path["mode.txt"]["change"] == "metadata"
    assert by_path["a.txt"]["change"] == "modified"
    assert [c["path"] for c in document["changes"]] == [
        "a.txt", "b.txt", "dir/sub", "dir/x", "kind", "mode.txt", "new.txt", "newdir",
        "newdir/nested", "newdir/nested/hardlink", "newlink", "opq", "opq/fresh", "renamed",
        "renamed/added"]

def test_diff_of_a_mount_over_its_own_base(workspace: Workspace) -> None:
    """The base is hidden by the mount; diff reaches it through the daemon's descriptors."""
    ws = workspace
    with unchanged(ws.base, "the base"), cowfs_mount([ws.base], ws.upper, ws.base):
        (ws.base / "new.txt").write_text("x")
        (ws.base / "b.txt").unlink()
        result = cowfs("diff", ws.base)
    assert result.out == "D  b.txt\nA  new.txt\n", result


def test_diff_exit_code_and_no_changes(workspace: Workspace) -> None:
    ws = workspace
    assert cowfs("diff", "--exit-code", "--lower", ws.base, ws.upper).status == 0
    (ws.upper / "x").write_text("x")
    result = cowfs("diff", "--exit-code", "--lower", ws.base, ws.upper)
    assert (result.status, result.out) == (1, "A  x\n")
    # An error is not "there are changes" (issue 21): status 2, as diff(1) says trouble.
    failed = cowfs("diff", "--exit-code", "--lower", ws.base / "missing", ws.upper)
    assert_user_error(failed, "does not exist")
    assert failed.status == 2, failed
    assert cowfs("diff", "--lower", ws.base / "missing", ws.upper).status == 1


def test_diff_bad_input(workspace: Workspace, tmp_path: Path) -> None:
    ws = workspace
    assert_user_error(cowfs("diff", tmp_path / "missing"), "does not exist")
    assert_user_error(cowfs("diff", ws.upper), "--lower")
    assert_user_error(cowfs("diff", "--lower", tmp_path / "nolower", ws.upper),
                      "lower directory", "does not exist")
    (tmp_path / "file").write_text("")
    assert_user_error(cowfs("diff", tmp_path / "file"), "not a directory")
    os.setxattr(ws.upper, "user.cowfs.format", b"99")
    assert_user_error(cowfs("diff", "--lower", ws.base, ws.upper), "format")


def test_walk_reports_anomalies_and_diff_warns(workspace: Workspace) -> None:
    ws = workspace
    (ws.upper / "stray").write_bytes(b"")
    os.setxattr(ws.upper / "stray", "user.overlay.whiteout", b"")
    (ws.upper / "d").mkdir()
    (ws.upper / "d/unmarked").write_bytes(b"")
    os.setxattr(ws.upper / "d/unmarked", "user.overlay.whiteout", b"")
    os.setxattr(ws.upper, "user.overlay.opaque", b"x")
    records = list(walk(ws.upper, [ws.base]))
    assert Anomaly("stray", Problem.STRAY_WHITEOUT) in records
    assert Anomaly("d/unmarked", Problem.UNMARKED_WHITEOUT) in records
    assert Added("d/unmarked", Kind.FILE) in records  # the mount shows it as a file
    result = cowfs("diff", "--lower", ws.base, ws.upper)
    assert result.out == "A  d/\nA  d/unmarked\n"
    assert "whiteout over nothing" in result.err
    assert "cowfs check" in result.err


def test_walk_understands_kernel_whiteouts_and_trusted_opaque(tmp_path: Path) -> None:
    """Lowers made by the kernel or Docker: char-device 0/0 whiteouts, trusted.overlay.opaque."""
    bottom = tmp_path / "bottom"
    (bottom / "d").mkdir(parents=True)
    (bottom / "d/hidden").write_text("x")
    (bottom / "gone").write_text("x")
    top = tmp_path / "top"
    (top / "d").mkdir(parents=True)
    os.setxattr(top / "d", "trusted.overlay.opaque", b"y")
    os.mknod(top / "gone", 0o020000, os.makedev(0, 0))
    upper = tmp_path / "upper"
    upper.mkdir()
    (upper / "d").mkdir()
    (upper / "d/hidden").write_text("new")  # nothing below: the lower d is opaque
    os.mknod(upper / "gone", 0o020000, os.makedev(0, 0))  # hides nothing: top whited it out
    records = list(walk(upper, [top, bottom]))
    assert Added("d/hidden", Kind.FILE) in records
    assert Anomaly("gone", Problem.STRAY_WHITEOUT) in records
    os.unlink(top / "gone")
    assert Deleted("gone", Kind.FILE) in list(walk(upper, [top, bottom]))


def test_quoting_of_unusual_names() -> None:
    assert quote("plain name.txt") == "plain name.txt"
    assert quote("ünïcode") == "ünïcode"
    assert quote('a"b') == '"a\\"b"'
    assert quote("new\nline") == '"new\\nline"'
    assert quote(os.fsdecode(b"bad\xffbyte")) == '"bad\\377byte"'
