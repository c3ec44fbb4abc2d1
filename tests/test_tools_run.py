"""``cowfs run``: a disposable writable view around a command. The base is never modified, the
command's exit status is passed on, the view is unmounted after success, failure, a crash, a
command that does not exist and Ctrl-C, and the changes are kept or discarded as asked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import pytest
from support import find_cowfs, mounted_fstype, needs_root, wait_until
from tools_support import Workspace, assert_user_error, cowfs, unchanged, workspace

from cowfs.tools import private

__all__ = ["workspace"]


def cowfs_mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f
                if " - fuse.cowfs " in line and line.split()[4].startswith(str(path))]


def test_run_over_the_base_discards_by_default(workspace: Workspace) -> None:
    ws = workspace
    script = "echo changed > a.txt; rm b.txt; mkdir new; pwd; exit 3"
    with unchanged(ws.base, "the base"):
        result = cowfs("run", ws.base, "--", "sh", "-c", script)
    assert result.status == 3
    assert result.out == f"{ws.base}\n"  # the command ran in the view, at the base's own path
    assert result.err.splitlines() == ["  M  a.txt", "  D  b.txt", "  A  new/",
                                       "cowfs run: 1 added, 1 modified, 1 deleted; discarded"]
    assert mounted_fstype(ws.base) is None


def test_run_keeps_changes_in_the_given_upper(workspace: Workspace) -> None:
    ws = workspace
    kept = ws.root / "kept"
    with unchanged(ws.base, "the base"):
        result = cowfs("run", "--upper", kept, ws.base, "--", "sh", "-c", "echo x > new.txt")
    assert result.status == 0, result
    assert f"kept in {kept}" in result.err
    assert (kept / "new.txt").read_text() == "x\n"
    assert cowfs("diff", "--lower", ws.base, kept).out == "A  new.txt\n"
    # --discard would delete the changes kept before: refused, nothing lost.
    refused = cowfs("run", "--discard", "--upper", kept, ws.base, "--", "true")
    assert_user_error(refused, "already holds")
    assert (kept / "new.txt").read_text() == "x\n"
    assert cowfs("reset", kept, "--yes").status == 0
    discarded = cowfs("run", "--discard", "--upper", kept, ws.base, "--", "touch", "more")
    assert "discarded" in discarded.err
    assert sorted(os.listdir(kept)) == [".cowfs-work"]


def test_run_at_another_mountpoint_keeps_a_temporary_upper(workspace: Workspace) -> None:
    ws = workspace
    with unchanged(ws.base, "the base"):
        result = cowfs("run", "--keep", "--at", ws.mnt, ws.base, "--", "sh", "-c",
                       "cat a.txt; touch made")
    assert result.out == "base:a.txt"
    upper = Path(result.err.rsplit("kept in ", 1)[1].strip())
    try:
        assert (upper / "made").exists()
        assert oct(upper.stat().st_mode & 0o777) == oct(ws.base.stat().st_mode & 0o777)
    finally:
        import shutil

        shutil.rmtree(upper.parent)
    assert mounted_fstype(ws.mnt) is None


def test_run_working_directory_follows_the_caller_inside_the_base(workspace: Workspace) -> None:
    ws = workspace
    result = cowfs("run", ws.base, "--", "pwd", cwd=ws.base / "dir")
    assert result.out == f"{ws.base}/dir\n"


def test_run_unmounts_after_a_crash_and_a_missing_command(workspace: Workspace) -> None:
    ws = workspace
    with unchanged(ws.base, "the base"):
        crashed = cowfs("run", ws.base, "--", sys.executable, "-c",
                        "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
        assert crashed.status == 128 + signal.SIGSEGV
        missing = cowfs("run", ws.base, "--", "no-such-command-anywhere")
    assert missing.status == 127
    assert "command not found" in missing.err
    assert "Traceback" not in missing.err
    assert mounted_fstype(ws.base) is None


def test_ctrl_c_reaches_the_command_and_still_unmounts(workspace: Workspace) -> None:
    ws = workspace
    marker = ws.root / "started"
    script = f"touch {marker}; echo x > /dev/null; sleep 60"
    with unchanged(ws.base, "the base"), tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([str(find_cowfs()), "run", "--at", ws.mnt, ws.base, "--", "sh",
                                 "-c", script], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            assert wait_until(marker.exists, 30)
            time.sleep(0.2)
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
            status = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        err.seek(0)
        message = err.read().decode()
    assert status == 128 + signal.SIGINT, message
    assert "discarded" in message
    assert mounted_fstype(ws.mnt) is None


def test_run_bad_input(workspace: Workspace, tmp_path: Path) -> None:
    assert_user_error(cowfs("run", tmp_path / "missing", "--", "true"), "does not exist")
    assert_user_error(cowfs("run", workspace.base), "no command")
    (tmp_path / "file").write_text("x")
    assert_user_error(cowfs("run", "--at", tmp_path / "file", workspace.base, "--", "true"),
                      "not a directory")
    assert_user_error(cowfs("run", "--upper", tmp_path / "file", workspace.base, "--", "true"),
                      "not a directory")
    assert not cowfs_mounts_under(tmp_path)


def test_run_creates_a_missing_mountpoint_and_removes_it(workspace: Workspace,
                                                         tmp_path: Path) -> None:
    """``--at`` and ``--upper`` are created with their parents (as ``mkdir -p``), and what was
    created for the view is gone afterwards; a kept upper stays."""
    result = cowfs("run", "--at", tmp_path / "no/such/view", "--upper", tmp_path / "new/upper",
                   workspace.base, "--", "sh", "-c", "cat a.txt; echo x > added")
    assert result.status == 0, result
    assert result.out == "base:a.txt"
    assert not (tmp_path / "no").exists()
    assert (tmp_path / "new/upper/added").read_text() == "x\n"
    result = cowfs("run", "--at", tmp_path / "v2", "--upper", tmp_path / "gone/upper",
                   "--discard", workspace.base, "--", "sh", "-c", "echo x > added")
    assert result.status == 0, result
    assert not (tmp_path / "v2").exists()
    assert not (tmp_path / "gone").exists()


def test_refused_run_changes_nothing(workspace: Workspace, tmp_path: Path) -> None:
    """An upper inside the base is refused before it is created; a failed mount leaves no
    ``cowfs-view-*`` scratch directory behind."""
    before = sorted(os.listdir(workspace.base))
    assert_user_error(cowfs("run", "--upper", workspace.base / "x", workspace.base, "--", "true"),
                      "inside lower")
    assert sorted(os.listdir(workspace.base)) == before
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    view = tmp_path / "view"
    inner = [str(find_cowfs()), "run", "--at", str(view), str(workspace.base), "--", "true"]
    result = subprocess.run(inner[:-1] + inner, env={**os.environ, "TMPDIR": str(scratch)},
                            capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode != 0, result.stderr
    assert "already mounted" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    result = subprocess.run([str(find_cowfs()), "run", "--at", str(tmp_path / "proc"),
                             "--upper", "/proc/self/nope", workspace.base, "--", "true"],
                            env={**os.environ, "TMPDIR": str(scratch)},
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert os.listdir(scratch) == []
    assert not (tmp_path / "proc").exists()
    for keep in ("--keep", "--discard"):
        result = subprocess.run([str(find_cowfs()), "run", keep, "--at", str(view),
                                 str(workspace.base), "--", "no-such-command"],
                                env={**os.environ, "TMPDIR": str(scratch)},
                                capture_output=True, text=True, check=False, timeout=120)
        assert result.returncode == 127, result.stderr
        assert os.listdir(scratch) == [], keep


def _start_run(*args: str | Path, err: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(find_cowfs()), "run", *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)


def test_runs_are_private_views_and_several_over_one_base_do_not_meet(
        workspace: Workspace) -> None:
    """Issue 21: by default only the job sees its view (a mount namespace of its own): other
    processes see the base unchanged and no mount on it, and a second run over the same base
    at the same time gets a view of its own. As root, and as a plain user (in a user namespace
    of the run's own)."""
    _needs_private_views()
    ws = workspace
    go = ws.root / "go"
    first_in = ws.root / "first-in"
    script = (f"echo first > mine; touch {first_in}; "
              f"i=0; while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; "
              "cat mine")
    with unchanged(ws.base, "the base"), tempfile.TemporaryFile() as err:
        first = _start_run(ws.base, "--", "sh", "-c", script, err=err)
        try:
            assert wait_until(first_in.exists, 30), "the first job did not start"
            assert mounted_fstype(ws.base) is None, "the first view is visible outside"
            assert not (ws.base / "mine").exists()
            second = cowfs("run", ws.base, "--", "sh", "-c",
                           "cat mine 2>/dev/null || echo none; cat a.txt")
            assert (second.status, second.out) == (0, "none\nbase:a.txt"), second
        finally:
            go.touch()
            out, _ = first.communicate(timeout=60)
        err.seek(0)
        message = err.read().decode()
    assert first.returncode == 0, message
    assert out == b"first\n"
    assert "1 added; discarded" in message


def _needs_private_views() -> None:
    if not private.available():
        pytest.skip("this kernel lets only root make namespaces (no user namespaces)")


def test_a_private_job_runs_as_its_user_without_capabilities(workspace: Workspace) -> None:
    """In a plain user's private view the job is that user, with no capability left from the
    user namespace the view was made in (the daemon has CAP_SYS_ADMIN there; the job does not);
    objects of other users show the overflow owner, as in any rootless container."""
    _needs_private_views()
    ws = workspace
    result = cowfs("run", ws.base, "--", "sh", "-c",
                   "id -u; id -g; sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status")
    assert result.status == 0, result
    uid, gid, caps = result.out.split()
    assert (int(uid), int(gid)) == (os.geteuid(), os.getegid())
    if os.geteuid() != 0:
        assert int(caps, 16) == 0, f"the job kept capabilities {caps}"


def test_a_shared_run_is_seen_by_every_process(workspace: Workspace) -> None:
    ws = workspace
    inside = ws.root / "inside"
    go = ws.root / "go"
    script = (f"touch {inside}; i=0; while [ ! -e {go} ] && [ $i -lt 600 ]; do sleep 0.05; "
              "i=$((i+1)); done")
    with unchanged(ws.base, "the base"), tempfile.TemporaryFile() as err:
        proc = _start_run("--shared", "--at", ws.mnt, ws.base, "--", "sh", "-c", script, err=err)
        try:
            assert wait_until(inside.exists, 30), "the job did not start"
            assert mounted_fstype(ws.mnt) == "fuse.cowfs"
            assert (ws.mnt / "a.txt").read_text() == "base:a.txt"
        finally:
            go.touch()
            proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert mounted_fstype(ws.mnt) is None


def test_run_takes_a_stack(workspace: Workspace) -> None:
    """``cowfs run L1:L2`` as ``cowfs mount`` takes it (issue 21: "base directory does not
    exist")."""
    ws = workspace
    top = ws.fresh("top")
    (top / "a.txt").write_text("top:a.txt")
    result = cowfs("run", "--at", ws.mnt, f"{top}:{ws.base}", "--", "sh", "-c",
                   "cat a.txt; echo; cat dir/x")
    assert result.status == 0, result
    assert result.out.splitlines()[0] == "top:a.txt"
    assert result.out.splitlines()[1] == (ws.base / "dir/x").read_text()


def test_the_root_directory_is_refused_as_a_mountpoint(workspace: Workspace) -> None:
    """fusermount3 cannot unmount ``/`` ("invalid abs path"): mounting there would leave the
    mount and its daemon behind. Run in a private mount namespace, so that a regression mounts
    over nobody else's ``/``."""
    ws = workspace
    # A plain user makes the mount namespace inside a user namespace (the plain-user test pass).
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    private = ["unshare", *user, "--mount", "--propagation", "private", str(find_cowfs())]
    for args in (["mount", ws.base, ws.upper, "/"], ["mount", ws.base, ws.upper, "//tmp/.."],
                 ["run", "--at", "/", ws.base, "--", "true"], ["run", "/", "--", "true"]):
        result = subprocess.run([*private, *map(str, args)], capture_output=True, text=True,
                                timeout=60, check=False, stdin=subprocess.DEVNULL)
        assert result.returncode == 1, (args, result)
        assert result.stderr.startswith("cowfs: error: cannot mount over "), result.stderr
        assert "root directory" in result.stderr
        assert "Traceback" not in result.stderr
    assert os.listdir(ws.upper) == []  # refused before anything was made


@pytest.fixture
def failing_fusermount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A ``fusermount3`` first on PATH that fails every unmount; ``.undo()`` puts PATH back."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "fusermount3").write_text(
        "#!/bin/sh\necho 'fusermount3: internal error: simulated' >&2\nexit 1\n")
    (fake / "fusermount3").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    # What a failed unmount leaves (the temporary upper it still serves from, a scratch
    # directory) is made in the test's own directory, which pytest removes.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    return monkeypatch


def test_a_failed_unmount_at_the_end_of_run_is_reported(
        workspace: Workspace, failing_fusermount: pytest.MonkeyPatch) -> None:
    """The view stays mounted and served, and the command says so and exits non-zero; the
    temporary upper it serves from is not deleted under it."""
    ws = workspace
    monkeypatch = failing_fusermount
    try:
        # Shared: a private view's mount is in a namespace the test cannot look into.
        result = cowfs("run", "--shared", "--at", ws.mnt, ws.base, "--", "sh", "-c",
                       "echo x > new.txt")
        assert result.status == 1, result
        for fragment in ("cannot unmount", "simulated", "still mounted", "(pid "):
            assert fragment in result.err, result.err
        assert mounted_fstype(ws.mnt) == "fuse.cowfs"
        assert (ws.mnt / "new.txt").read_text() == "x\n"  # still served, upper and all
    finally:
        monkeypatch.undo()
        if mounted_fstype(ws.mnt) == "fuse.cowfs":
            assert cowfs("umount", ws.mnt).status == 0


def test_a_private_view_that_cannot_be_unmounted_is_detached(
        workspace: Workspace, failing_fusermount: pytest.MonkeyPatch) -> None:
    """Nobody else can see a private view: one its unmount fails for is detached, so that its
    daemon ends instead of serving a namespace nobody can enter."""
    needs_root("a private view needs a mount namespace")
    ws = workspace
    result = cowfs("run", "--at", ws.mnt, ws.base, "--", "sh", "-c", "echo x > new.txt")
    failing_fusermount.undo()
    assert result.status == 1, result
    assert "simulated" in result.err, result.err
    pid = int(result.err.split("(pid ")[1].split(")")[0])
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 30), "the daemon lingers"
