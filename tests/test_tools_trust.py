"""The offline commands against directories a less-trusted user wrote (issue 20, items 1, 2, 7).

The threat model (docs/workspaces.md, "What the offline commands trust"): root runs cowfs on a
base, an upper, a journal and records that another user can write. Each hostile test runs that
user's part as uid 65534 ('nobody', in a forked child: :func:`support.call_as`) in a directory
both can reach, then root's command, and asserts that nothing outside the layers changed, that
the upper still holds its changes, and that the refusal is one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import (
    build_layer,
    call_as,
    cowfs_mount,
    find_cowfs,
    mounted_fstype,
    needs_root,
    tree_state,
)
from tools_support import Workspace, assert_user_error, cowfs, unchanged, workspace

import cowfs as api
from cowfs.core.errors import CowfsError

__all__ = ["workspace"]

NOBODY = 65534


@dataclass(slots=True)
class Shared:
    """Root's upper over a base that 'nobody' owns and writes, and ``outside``: root's own
    directory next to them (a victim file, and a directory shaped like a work directory)."""

    root: Path
    base: Path
    upper: Path
    mnt: Path
    outside: Path

    def give_upper_to_nobody(self) -> None:
        """Make the upper nobody's (as if nobody had mounted it), so that nobody can forge its
        records."""
        for path in [self.upper, *self.upper.rglob("*")]:
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


@pytest.fixture
def shared() -> Iterator[Shared]:
    needs_root("acting as 'nobody' against root's commands")
    root = Path(tempfile.mkdtemp(prefix="cowfs-trust-"))
    try:
        root.chmod(0o755)
        base = build_layer(root / "base", {"a.txt": None, "f2": None, "dir/x": None}, "base")
        for path in [base, *base.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        outside = build_layer(root / "outside", {"victim": "root's", "w/tmp/keep": "root's",
                                                 "w/index/1-2": "root's"}, "outside")
        upper, mnt = root / "upper", root / "mnt"
        upper.mkdir()
        mnt.mkdir()
        shared = Shared(root, base, upper, mnt, outside)
        with cowfs_mount([base], upper, mnt):
            (mnt / "new.txt").write_text("new\n")
            with open(mnt / "a.txt", "a") as f:
                f.write("more\n")
            (mnt / "f2").unlink()
        yield shared
        assert mounted_fstype(mnt) is None, "a test left its mount behind"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _as_nobody(action: Callable[[], object]) -> None:
    call_as(NOBODY, NOBODY, action)


def _diff(upper: Path) -> str:
    result = cowfs("diff", upper)
    assert result.status == 0, result
    return result.out


# --- 1: the commit journal in BASE ---------------------------------------------------------------


def _planted_plan(s: Shared, steps: list[list[object]]) -> str:
    """A journal as cowfs wrote it before this round (version 1, with a work directory)."""
    return json.dumps({"version": 1, "upper": str(s.upper.resolve()),
                       "base": str(s.base.resolve()), "work": str(s.outside / "w"),
                       "summary": "1 deleted", "steps": steps})


@pytest.mark.parametrize("attack", ["dotdot-and-work", "done-past-the-plan"])
def test_a_journal_planted_in_the_base_is_not_resumed(shared: Shared, attack: str) -> None:
    """Nobody, who can write BASE, plants a journal naming root's upper; no commit was ever
    interrupted. Root's ordinary commit must not resume it: no file outside BASE deleted, no
    foreign work directory emptied, and the upper not emptied without its changes applied."""
    s = shared
    steps: list[list[object]] = [["REMOVE", "../outside/victim", "", "", None]] \
        if attack == "dotdot-and-work" else [["REMOVE", "a.txt", "", "", None]]
    plan = _planted_plan(s, steps)

    def plant() -> None:
        journal = s.base / ".cowfs-commit"
        journal.mkdir(mode=0o700)
        (journal / "plan.json").write_text(plan)
        (journal / "done").write_text("" if attack == "dotdot-and-work" else "5\n")

    _as_nobody(plant)
    before = _diff(s.upper)
    with unchanged(s.outside, "root's directory outside the base"), \
            unchanged(s.upper, "the upper"), unchanged(s.base, "the base"):
        refused = cowfs("commit", s.upper, "--into", s.base, "--yes")
        assert_user_error(refused, "owned by uid 65534", "refusing to resume")
    assert _diff(s.upper) == before
    # Once the planted journal is gone, the same command commits.
    shutil.rmtree(s.base / ".cowfs-commit")
    done = cowfs("commit", s.upper, "--into", s.base, "--yes")
    assert done.status == 0, done
    assert (s.base / "new.txt").read_text() == "new\n"
    assert not (s.base / "f2").exists()
    assert (s.outside / "victim").read_text() == "root's"


def test_only_the_journal_the_upper_records_is_resumed(workspace: Workspace) -> None:
    """A journal of the committing user's own that the upper does not record (its mark
    removed, or another plan put in its place) is not resumed; the recorded one is."""
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "new.txt").write_text("new\n")
        (ws.mnt / "b.txt").unlink()
    killed = subprocess.run([str(find_cowfs()), "commit", str(ws.upper), "--into", str(ws.base),
                             "--yes"], env={**os.environ, "COWFS_TEST_COMMIT_FAULT": "0:KILL"},
                            capture_output=True, check=False, timeout=60)
    assert killed.returncode == -9, killed
    plan = ws.base / ".cowfs-commit/plan.json"
    mark = os.getxattr(ws.upper, "user.cowfs.committing")
    changes = tree_state(ws.upper, times=False)
    base = tree_state(ws.base, skip=[".cowfs-commit"])
    os.removexattr(ws.upper, "user.cowfs.committing")
    assert_user_error(cowfs("commit", ws.upper, "--into", ws.base, "--yes"),
                      "does not record", "no user.cowfs.committing mark")
    os.setxattr(ws.upper, "user.cowfs.committing", mark)
    original = plan.read_text()
    forged = json.loads(original)
    forged["steps"] = [["REMOVE", "a.txt", "", "", None]]
    plan.write_text(json.dumps(forged))
    assert_user_error(cowfs("commit", ws.upper, "--into", ws.base, "--yes"),
                      "does not record", "another plan")
    plan.write_text(original)
    done = ws.base / ".cowfs-commit/done"
    done.write_text("99\n")  # past the plan: the re-run would skip every step
    assert_user_error(cowfs("commit", ws.upper, "--into", ws.base, "--yes"),
                      "99 steps recorded as done", "plan of 2")
    done.write_text("")
    assert tree_state(ws.base, skip=[".cowfs-commit"]) == base
    assert tree_state(ws.upper, times=False) == changes
    finished = cowfs("commit", ws.upper, "--into", ws.base, "--yes")
    assert finished.status == 0, finished
    assert (ws.base / "new.txt").read_text() == "new\n"
    assert (ws.base / "a.txt").exists()
    assert not (ws.base / "b.txt").exists()


# --- 2: the stack record -----------------------------------------------------------------------


def _record(upper: Path) -> dict[str, object]:
    return json.loads(os.getxattr(upper, "user.cowfs.stack"))  # type: ignore[no-any-return]


@pytest.mark.parametrize("owner", ["nobody", "root-writable-by-all"])
@pytest.mark.parametrize("command", ["reset", "commit", "diff"])
def test_a_forged_work_directory_is_neither_emptied_nor_read(shared: Shared, command: str,
                                                             owner: str) -> None:
    """Nobody, who can write an upper (its own; or root's, mode 0777), points its stack
    record's ``work`` at root's directory; root's reset or commit would empty its ``tmp/`` and
    ``index/``, and diff read that index. Refused by the owner check (nobody's upper, root's
    directory) or by the mark only the upper's own mount writes (root's upper and directory)."""
    s = shared
    if owner == "nobody":
        s.give_upper_to_nobody()
    else:
        s.upper.chmod(0o777)
    record = _record(s.upper)
    record["work"] = str(s.outside / "w")
    value = json.dumps(record).encode()
    _as_nobody(lambda: os.setxattr(s.upper, "user.cowfs.stack", value))
    args = {"reset": ["reset", s.upper, "--yes"],
            "commit": ["commit", s.upper, "--into", s.base, "--yes"],
            "diff": ["diff", s.upper]}[command]
    why = "owned by uid 0, the upper by uid 65534" if owner == "nobody" else \
        "does not carry the user.cowfs.upper mark of this upper"
    with unchanged(s.outside, "root's directory"), unchanged(s.upper, "the upper"), \
            unchanged(s.base, "the base"):
        assert_user_error(cowfs(*args), "is not that upper's", why)


def test_a_symlink_at_the_default_work_directory_is_not_followed(shared: Shared) -> None:
    """Nobody replaces its upper's ``.cowfs-work`` with a symlink to root's directory whose
    ``index/`` holds an entry named after a lower hard-linked file: diff, export and commit would
    serve root's entry as that file's content (export writing it into the tar, commit into BASE)."""
    s = shared
    os.link(s.base / "dir/x", s.base / "dir/y")
    entry = s.outside / f"w/index/1-{os.stat(s.base / 'dir/x').st_ino}"
    entry.write_text("root's secret\n")
    entry.chmod(0o600)
    s.give_upper_to_nobody()

    def plant() -> None:
        shutil.rmtree(s.upper / ".cowfs-work")
        os.symlink(s.outside / "w", s.upper / ".cowfs-work")

    _as_nobody(plant)
    with unchanged(s.outside, "root's directory"):
        assert "dir/" not in _diff(s.upper)
        tar = s.root / "layer.tar"
        assert cowfs("export", s.upper, "-o", tar).status == 0
        assert b"root's secret" not in tar.read_bytes()
        done = cowfs("commit", s.upper, "--into", s.base, "--yes")
        assert done.status == 0, done
    assert (s.base / "dir/x").read_text() == "base:dir/x"
    assert os.path.islink(s.upper / ".cowfs-work")  # left alone, as everything not cowfs's


def test_commit_of_an_upper_without_a_stack_record_is_refused(shared: Shared) -> None:
    """With the record removed, the upper's whiteout of ``f2`` would delete ``f2`` of any
    directory root commits it into."""
    s = shared
    s.give_upper_to_nobody()
    _as_nobody(lambda: os.removexattr(s.upper, "user.cowfs.stack"))
    other = build_layer(s.root / "other", {"f2": "root's", "a.txt": "root's"}, "other")
    with unchanged(other, "another directory"), unchanged(s.upper, "the upper"):
        assert_user_error(cowfs("commit", s.upper, "--into", other, "--yes"),
                          "records no lower stack", "--relocate")
    done = cowfs("commit", s.upper, "--into", other, "--relocate", "--yes")  # said on purpose
    assert done.status == 0, done
    assert not (other / "f2").exists()


@pytest.mark.parametrize("value", [
    b'{"version": 1, "lowers": [{"path": "/x", "dev": 1e400, "ino": 1}]}',
    b"[" * 1500 + b"]" * 1500,  # deeper than Python's json can parse; 3000 bytes fit ext4's xattrs
])
def test_a_malformed_stack_record_is_one_line_in_mount_diff_and_check(shared: Shared,
                                                                      value: bytes) -> None:
    s = shared
    s.give_upper_to_nobody()
    _as_nobody(lambda: os.setxattr(s.upper, "user.cowfs.stack", value))
    with unchanged(s.upper, "the upper"), unchanged(s.base, "the base"):
        try:
            assert_user_error(cowfs("mount", s.base, s.upper, s.mnt), "malformed stack record")
        finally:
            if mounted_fstype(s.mnt) is not None:
                cowfs("umount", s.mnt)
        assert_user_error(cowfs("diff", s.upper), "malformed stack record", "--lower")
        assert_user_error(cowfs("check", s.upper), "malformed stack record", "--lower")


# --- 7: swapped layers, another work directory, View.discard -----------------------------------


def test_a_mount_with_the_layers_swapped_is_refused_before_writing(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "new.txt").write_text("new\n")
    with unchanged(ws.base, "the base"), unchanged(ws.upper, "the upper"):
        try:
            assert_user_error(cowfs("mount", ws.upper, ws.base, ws.mnt), "swapped",
                              "nothing was written")
        finally:
            if mounted_fstype(ws.mnt) is not None:
                cowfs("umount", ws.mnt)
    assert not (ws.base / ".cowfs-work").exists()
    assert [n for n in os.listxattr(ws.base) if n.startswith("user.cowfs.")] == []


def test_a_mount_with_another_work_directory_is_refused(workspace: Workspace) -> None:
    ws = workspace
    first, second = ws.fresh("work1"), ws.fresh("work2")
    for work in (first, second):
        work.chmod(0o700)
    with cowfs_mount([ws.base], ws.upper, ws.mnt, work=first):
        (ws.mnt / "new.txt").write_text("new\n")
    for given in (["--work", str(second)], []):
        with unchanged(ws.upper, "the upper"), unchanged(second, "the other work directory"):
            try:
                assert_user_error(cowfs("mount", *given, ws.base, ws.upper, ws.mnt),
                                  "last mounted with work directory", str(first), "-o relocate")
            finally:
                if mounted_fstype(ws.mnt) is not None:
                    cowfs("umount", ws.mnt)
    with cowfs_mount([ws.base], ws.upper, ws.mnt, work=first):
        assert (ws.mnt / "new.txt").read_text() == "new\n"
    # A work directory that serves another upper is not taken over either.
    other = ws.fresh("other-upper")
    with unchanged(first, "the first upper's work directory"):
        try:
            assert_user_error(cowfs("mount", "--work", first, ws.base, other, ws.mnt),
                              "belongs to another upper")
        finally:
            if mounted_fstype(ws.mnt) is not None:
                cowfs("umount", ws.mnt)
    with cowfs_mount([ws.base], ws.upper, ws.mnt, work=second, options=["relocate"]):
        pass
    assert _record(ws.upper)["work"] == str(second.resolve())


def test_view_discard_keeps_what_a_given_upper_held_before(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "earlier.txt").write_text("yesterday's work\n")
    with api.overlay(ws.base, ws.upper, keep=True) as view:
        (view.path / "now.txt").write_text("today\n")
        with pytest.raises(CowfsError, match="all_changes=True"):
            view.discard()
        assert (view.path / "earlier.txt").read_text() == "yesterday's work\n"
        assert (view.path / "now.txt").read_text() == "today\n"
        view.discard(all_changes=True)
        assert not (view.path / "earlier.txt").exists()
    fresh = ws.root / "fresh"
    with api.overlay(ws.base, fresh, keep=True) as view:
        (view.path / "now.txt").write_text("today\n")
        view.discard()  # a new upper: only this view's changes are in it
        assert not (view.path / "now.txt").exists()
