"""Workspace commands never destroy what they were not meant to (issue 9, section 4): targets are
checked before anything changes, ``cowfs run --discard`` removes only what cowfs created, a commit
interrupted at any point is finished by running it again, and an interrupted export or import
leaves no temporary files."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from support import cowfs_mount, find_cowfs, merged_view, tree_state
from tools_support import (
    Result,
    Workspace,
    assert_user_error,
    cowfs,
    make_changes,
    unchanged,
    view_of,
    workspace,
)

from cowfs.tools.workspace import commit

__all__ = ["workspace"]

COMMIT_FAULT = "COWFS_TEST_COMMIT_FAULT"
UNRECORDED_FAULT = "COWFS_TEST_COMMIT_FAULT_UNRECORDED"


def cowfs_env(*args: str | Path, env: dict[str, str]) -> Result:
    """``cowfs ARGS`` with extra environment variables (the test seams)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        status = subprocess.run([str(find_cowfs()), *map(str, args)], env={**os.environ, **env},
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=60,
                                check=False).returncode
        out.seek(0)
        err.seek(0)
        return Result(status, out.read().decode(errors="replace"),
                      err.read().decode(errors="replace"))


# --- targets are checked -------------------------------------------------------------------------


def test_reset_refuses_a_live_view_and_a_plain_directory(workspace: Workspace) -> None:
    ws = workspace
    plain = ws.fresh("plain")
    (plain / "precious").write_text("keep me")
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        (ws.mnt / "new.txt").write_text("through the view")
        with unchanged(ws.upper, "the upper"), unchanged(ws.base, "the base"):
            assert_user_error(cowfs("reset", ws.mnt, "--yes"), "cowfs mountpoint")
            assert_user_error(cowfs("reset", ws.mnt, "new.txt", "--yes"), "cowfs mountpoint")
            assert_user_error(cowfs("commit", ws.mnt, "--into", plain, "--yes"),
                              "cowfs mountpoint")
        assert (ws.mnt / "new.txt").read_text() == "through the view"
    with unchanged(plain, "a plain directory"):
        assert_user_error(cowfs("reset", plain, "--yes"), "not a cowfs upper")
        assert_user_error(cowfs("reset", plain, "precious", "--yes"), "not a cowfs upper")
        assert_user_error(cowfs("commit", plain, "--into", ws.base, "--yes"),
                          "not a cowfs upper")


def test_commit_with_swapped_arguments_is_refused(workspace: Workspace) -> None:
    ws = workspace
    project = ws.fresh("project")
    (project / "work.txt").write_text("a day's work")
    upper = ws.fresh("changes")
    with cowfs_mount([project], upper, ws.mnt):
        (ws.mnt / "new.txt").write_text("new")
    with unchanged(project, "the project"), unchanged(upper, "the upper"):
        assert_user_error(cowfs("commit", project, "--into", upper, "--yes"),
                          "not a cowfs upper")
    os.setxattr(project, "user.cowfs.format", b"1")  # marked too: the base is an upper still
    with unchanged(project, "the project"), unchanged(upper, "the upper"):
        assert_user_error(cowfs("commit", project, "--into", upper, "--yes"), "swapped")


def test_run_discard_never_deletes_what_was_in_the_upper(workspace: Workspace) -> None:
    ws = workspace
    used = ws.fresh("used")
    (used / "precious").write_text("keep me")
    with unchanged(used, "a directory with a file"), unchanged(ws.base, "the base"):
        assert_user_error(cowfs("run", "--discard", "--upper", used, "--at", ws.mnt, ws.base,
                                "--", "true"), "neither empty nor a cowfs upper")
        assert_user_error(cowfs("run", "--upper", used, "--at", ws.mnt, ws.base, "--", "true"),
                          "neither empty nor a cowfs upper")
    empty = ws.fresh("empty")
    result = cowfs("run", "--discard", "--upper", empty, "--at", ws.mnt, ws.base, "--", "sh",
                   "-c", "echo x > new.txt")
    assert result.status == 0, result
    assert os.listdir(empty) == []  # as it was: no work directory, no marker left behind
    assert os.listxattr(empty) == []
    fresh = ws.root / "fresh"
    assert cowfs("run", "--discard", "--upper", fresh, "--at", ws.mnt, ws.base, "--",
                 "true").status == 0
    assert not fresh.exists()


def test_api_discard_never_deletes_what_was_in_the_upper(workspace: Workspace) -> None:
    import cowfs as api

    ws = workspace
    used = ws.fresh("used")
    (used / "precious").write_text("keep me")
    with pytest.raises(api.CowfsError, match="already holds"), \
            api.overlay(ws.base, used, keep=False):
        pass
    assert (used / "precious").read_text() == "keep me"


# --- commit: interrupted anywhere, finished by running it again ----------------------------------


def _scenario(ws: Workspace) -> None:
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        make_changes(ws.mnt)


def _copy(ws: Workspace, name: str) -> tuple[Path, Path]:
    """A copy of the base and the upper (xattrs, hard links and the index kept)."""
    root = ws.root / name
    root.mkdir()
    subprocess.run(["cp", "-a", str(ws.base), str(root / "base")], check=True)
    subprocess.run(["cp", "-a", str(ws.upper), str(root / "upper")], check=True)
    return root / "base", root / "upper"


def _leftovers(base: Path) -> list[str]:
    return [str(p.relative_to(base)) for p in base.rglob(".cowfs-commit*")]


def test_commit_killed_at_every_step_is_finished_by_running_it_again(
        workspace: Workspace) -> None:
    ws = workspace
    _scenario(ws)
    expected_view = view_of([ws.base], ws.upper, ws.mnt)
    base, upper = _copy(ws, "reference")
    done = cowfs("commit", upper, "--into", base, "--relocate", "--yes")
    assert done.status == 0, done
    expected = tree_state(base, times=False)
    n = 0
    while True:
        base, upper = _copy(ws, f"kill-{n}")
        killed = cowfs_env("commit", upper, "--into", base, "--relocate", "--yes",
                           env={COMMIT_FAULT: f"{n}:KILL"})
        if killed.status == 0:  # past the last event: nothing was interrupted
            assert n > 3
            break
        assert killed.status == -9, killed
        if n == 2:  # the upper of an unfinished commit: no mount, reset or repair
            assert_user_error(cowfs("reset", upper, "--yes"), "interrupted commit")
            assert_user_error(cowfs("check", upper, "--repair", "--yes"), "interrupted commit")
            check = cowfs("check", upper)
            assert check.status == 1
            assert "interrupted commit" in check.out
        # The re-run, in this process (the same code as the command, one start-up less).
        assert commit(upper, base, yes=True, dry_run=False, relocate=True, out=io.StringIO())
        assert tree_state(base, times=False) == expected, n
        assert _leftovers(base) == [], n
        assert sorted(os.listdir(upper)) == [".cowfs-work"], n
        assert "user.cowfs.committing" not in os.listxattr(upper)
        shutil.rmtree(base.parent)
        n += 1
    with cowfs_mount([base], upper, ws.mnt, options=["relocate"]):
        assert merged_view(ws.mnt) == expected_view


def test_commit_killed_inside_a_step_of_each_kind_is_finished_by_running_it_again(
        workspace: Workspace) -> None:
    """Killed after a step took effect but before the journal says so: the re-run applies it
    again, which must give the same result (one step of each kind)."""
    ws = workspace
    _scenario(ws)
    base, upper = _copy(ws, "reference")
    with tempfile.TemporaryDirectory() as scratch:
        steps = journal_steps(base, upper, Path(scratch))
    assert commit(upper, base, yes=True, dry_run=False, relocate=True, out=io.StringIO())
    expected = tree_state(base, times=False)
    firsts = {op: n for n, op in reversed(list(enumerate(steps, start=1)))}
    assert len(firsts) >= 6, firsts  # every kind of step but, perhaps, one
    for op, n in sorted(firsts.items()):
        base, upper = _copy(ws, f"unrecorded-{op}")
        killed = cowfs_env("commit", upper, "--into", base, "--relocate", "--yes",
                           env={UNRECORDED_FAULT: f"{n}:KILL"})
        assert killed.status == -9, (op, killed)
        assert commit(upper, base, yes=True, dry_run=False, relocate=True, out=io.StringIO())
        assert tree_state(base, times=False) == expected, op
        assert _leftovers(base) == [], op
        shutil.rmtree(base.parent)


def journal_steps(base: Path, upper: Path, scratch: Path) -> list[str]:
    """The kinds of the steps a commit of ``upper`` into ``base`` takes, in order (read from
    the journal of a commit killed before its first step, in a copy)."""
    subprocess.run(["cp", "-a", str(base), str(scratch / "base")], check=True)
    subprocess.run(["cp", "-a", str(upper), str(scratch / "upper")], check=True)
    killed = cowfs_env("commit", scratch / "upper", "--into", scratch / "base", "--relocate",
                       "--yes", env={COMMIT_FAULT: "0:KILL"})
    assert killed.status == -9, killed
    plan = json.loads((scratch / "base/.cowfs-commit/plan.json").read_text())
    return [step[0] for step in plan["steps"]]


@pytest.mark.parametrize("signal_name", ["INT", "TERM"])
def test_commit_interrupted_by_a_signal_says_so_and_resumes(workspace: Workspace,
                                                            signal_name: str) -> None:
    ws = workspace
    _scenario(ws)
    before = view_of([ws.base], ws.upper, ws.mnt)
    result = cowfs_env("commit", ws.upper, "--into", ws.base, "--yes",
                       env={COMMIT_FAULT: f"5:{signal_name}"})
    assert_user_error(result, "interrupted", "run the same command again")
    assert result.status == 128 + {"INT": 2, "TERM": 15}[signal_name]
    assert "after 5 of" in result.err
    # Mounting the upper now would show a half-committed base under it: refused.
    mounted = cowfs("mount", ws.base, ws.upper, ws.mnt)
    assert_user_error(mounted, "interrupted commit")
    assert cowfs("commit", ws.upper, "--into", ws.base, "--yes").status == 0
    assert view_of([ws.base], ws.upper, ws.mnt) == before
    assert _leftovers(ws.base) == []


def test_commit_of_another_upper_into_a_half_committed_base_is_refused(
        workspace: Workspace) -> None:
    ws = workspace
    _scenario(ws)
    result = cowfs_env("commit", ws.upper, "--into", ws.base, "--yes",
                       env={COMMIT_FAULT: "3:KILL"})
    assert result.status != 0
    other = ws.fresh("other")
    with cowfs_mount([ws.base], other, ws.mnt):
        pass
    refused = cowfs("commit", other, "--into", ws.base, "--relocate", "--yes")
    assert_user_error(refused, "unfinished", str(ws.upper))
    assert cowfs("commit", ws.upper, "--into", ws.base, "--yes").status == 0


# --- export and import ---------------------------------------------------------------------------


def _temporaries(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if ".cowfs-" in n)


@pytest.mark.parametrize("signal_name", ["INT", "TERM"])
def test_interrupted_export_and_import_leave_no_temporary_files(workspace: Workspace,
                                                                signal_name: str) -> None:
    ws = workspace
    _scenario(ws)
    out = ws.fresh("out")
    result = cowfs_env("export", ws.upper, "-o", out / "layer.tar",
                       env={"COWFS_TEST_EXPORT_FAULT": f"3:{signal_name}"})
    assert_user_error(result, "export interrupted", "was not written")
    assert os.listdir(out) == []
    assert cowfs("export", ws.upper, "-o", out / "layer.tar").status == 0
    result = cowfs_env("import", out / "layer.tar", out / "layer",
                       env={"COWFS_TEST_IMPORT_FAULT": f"3:{signal_name}"})
    assert_user_error(result, "import interrupted", "was not created")
    assert os.listdir(out) == ["layer.tar"]


def test_killed_export_and_import_leftovers_are_removed_by_the_next_run(
        workspace: Workspace) -> None:
    ws = workspace
    _scenario(ws)
    out = ws.fresh("out")
    killed = cowfs_env("export", ws.upper, "-o", out / "layer.tar",
                       env={"COWFS_TEST_EXPORT_FAULT": "3:KILL"})
    assert killed.status != 0
    assert len(_temporaries(out)) == 1
    assert _temporaries(out)[0].startswith(".layer.tar.cowfs-export-")
    assert cowfs("export", ws.upper, "-o", out / "layer.tar").status == 0
    assert os.listdir(out) == ["layer.tar"]
    killed = cowfs_env("import", out / "layer.tar", out / "layer",
                       env={"COWFS_TEST_IMPORT_FAULT": "3:KILL"})
    assert killed.status != 0
    assert len(_temporaries(out)) == 1
    assert cowfs("import", out / "layer.tar", out / "layer").status == 0
    assert sorted(os.listdir(out)) == ["layer", "layer.tar"]
    assert merged_view(out / "layer")  # complete: something was imported
