"""``cowfs commit`` and ``cowfs reset`` on real layers: the commit round trip (the base mounted
with an empty upper shows what the overlay showed), plans applied only with --yes, refusal while
mounted, and bad input losing nothing."""

from __future__ import annotations

import os
from pathlib import Path

from support import cowfs_mount, merged_view, tree_state
from tools_support import (
    Workspace,
    assert_user_error,
    cowfs,
    make_changes,
    unchanged,
    view_of,
    workspace,
)

__all__ = ["workspace"]


def upper_is_empty(upper: Path) -> bool:
    return sorted(os.listdir(upper)) == [".cowfs-work"] and \
        os.getxattr(upper, "user.cowfs.format") == b"1"


def test_commit_round_trip(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        make_changes(ws.mnt)
        before = merged_view(ws.mnt)
    result = cowfs("commit", ws.upper, "--into", ws.base, "--yes")
    assert result.status == 0, result
    assert "committed into" in result.out
    assert "1 renamed" in result.out
    assert upper_is_empty(ws.upper)
    after = view_of([ws.base], ws.upper, ws.mnt)
    assert after == before
    # The base is now a plain directory with the changes: no layer metadata leaked into it.
    for rel, entry in tree_state(ws.base).items():
        assert not any(name.startswith(("user.overlay.", "user.cowfs.")) for name, _ in
                       entry.xattrs), rel
    assert (ws.base / "new.txt").stat().st_ino == (ws.base / "newdir/nested/hardlink").stat().st_ino
    assert not any(name.startswith(".cowfs-commit") for name in os.listdir(ws.base))


def test_commit_shows_the_plan_and_applies_only_with_yes(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "a.txt").write_text("changed")
        (ws.mnt / "b.txt").unlink()
    with unchanged(ws.base, "the base"), unchanged(ws.upper, "the upper"):
        plain = cowfs("commit", ws.upper, "--into", ws.base)
        dry = cowfs("commit", ws.upper, "--into", ws.base, "--dry-run")
    assert plain.status == 1
    assert "--yes" in plain.err
    assert "Traceback" not in plain.err
    assert dry.status == 0
    assert plain.out == dry.out == f"write   a.txt\ndelete  b.txt\nthen empty {str(ws.upper)!r}\n"
    assert cowfs("commit", ws.upper, "--into", ws.base, "-y").status == 0
    assert (ws.base / "a.txt").read_text() == "changed"
    assert not (ws.base / "b.txt").exists()
    again = cowfs("commit", ws.upper, "--into", ws.base, "-y")
    assert (again.status, again.out) == (0, "nothing to commit\n")


def test_commit_refuses_while_the_upper_is_mounted(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "a.txt").write_text("changed")
        with unchanged(ws.base, "the base"), unchanged(ws.upper, "the upper"):
            assert_user_error(cowfs("commit", ws.upper, "--into", ws.base, "--yes"),
                              "unmount it first")
            assert_user_error(cowfs("reset", ws.upper, "--yes"), "unmount it first")
            assert_user_error(cowfs("check", ws.upper, "--repair", "--yes"),
                              "unmount it first")


def test_commit_refuses_a_base_in_use_and_bad_input(workspace: Workspace, tmp_path: Path) -> None:
    ws = workspace
    (ws.upper / "x").write_text("x")
    os.setxattr(ws.upper, "user.cowfs.format", b"1")  # an upper made by hand
    other_upper = ws.fresh("other-upper")
    with unchanged(ws.upper, "the upper"):
        with cowfs_mount([ws.base], other_upper, ws.mnt), unchanged(ws.base, "the base"):
            assert_user_error(cowfs("commit", ws.upper, "--into", ws.base, "--yes"),
                              "lower layer of the cowfs mount")
        assert_user_error(cowfs("commit", ws.upper, "--into", tmp_path / "nobase", "--yes"),
                          "does not exist")
        assert_user_error(cowfs("commit", tmp_path / "noupper", "--into", ws.base, "--yes"),
                          "does not exist")
        assert_user_error(cowfs("commit", ws.upper, "--into", ws.upper / "x", "--yes"),
                          "not a directory")


def test_reset_everything(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        original = merged_view(ws.mnt)
        make_changes(ws.mnt)
    with unchanged(ws.base, "the base"):
        dry = cowfs("reset", ws.upper, "-n")
        assert dry.status == 0
        assert "discard new.txt" in dry.out
        assert cowfs("reset", ws.upper, "-y").status == 0
        assert upper_is_empty(ws.upper)
        assert view_of([ws.base], ws.upper, ws.mnt) == original


def test_reset_paths(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        original = merged_view(ws.mnt)
        make_changes(ws.mnt)
        changed = merged_view(ws.mnt)
    with unchanged(ws.base, "the base"):
        with unchanged(ws.upper, "the upper"):  # a path without a change: nothing is reset
            assert_user_error(cowfs("reset", ws.upper, "a.txt", "nothing-here", "-y"),
                              "no change at nothing-here", "nothing was reset")
        result = cowfs("reset", ws.upper, "a.txt", "/b.txt", "renamed", "-y")
        assert result.status == 0, result
        assert "discard old" in result.out  # the renamed directory's original comes back
        after = view_of([ws.base], ws.upper, ws.mnt)
    for path in ("a.txt", "b.txt", "old", "old/inner/z", "old/keep"):
        assert after[path] == original[path], path
    assert "renamed" not in after
    assert after["new.txt"] == changed["new.txt"]
    assert_user_error(cowfs("reset", ws.upper, "../escape", "-y"), "'..'")


def test_commit_keeps_lower_hard_links_one_file(workspace: Workspace) -> None:
    """A copied-up lower hard link: the mount serves the other names from its index; the commit
    must write every name, as one file."""
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        with open(ws.mnt / "hard/one", "a") as f:
            f.write("more\n")
        before = merged_view(ws.mnt)
    assert not (ws.upper / "hard/two").exists()  # served from the index
    diff = cowfs("diff", "--lower", ws.base, ws.upper)
    assert diff.out == "M  hard/one\nM  hard/two\n"
    assert cowfs("commit", ws.upper, "--into", ws.base, "-y").status == 0
    assert (ws.base / "hard/two").read_text() == "base:hard/one" + "more\n"
    assert (ws.base / "hard/one").stat().st_ino == (ws.base / "hard/two").stat().st_ino
    assert view_of([ws.base], ws.upper, ws.mnt) == before
