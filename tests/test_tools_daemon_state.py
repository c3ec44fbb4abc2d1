"""What the commands say about daemons and locks that are not what they seem: a daemon killed
with SIGKILL (``status`` says it is gone, ``umount`` removes the dead mount and succeeds), the
default log of a background mount, a second commit of an upper while one runs, and the state
directory a session keeps to itself (``COWFS_STATE_DIR``)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from support import find_cowfs, mounted_fstype, wait_until
from tools_support import Workspace, cowfs, workspace

from cowfs.core import mounts, schema

__all__ = ["workspace"]


@contextlib.contextmanager
def background_mount(ws: Workspace) -> Iterator[str]:
    """``cowfs mount BASE UPPER MNT`` in the background; yields its stderr; always unmounted."""
    try:
        result = cowfs("mount", ws.base, ws.upper, ws.mnt)
        assert result.status == 0, result
        yield result.err
    finally:
        if mounted_fstype(ws.mnt) is not None:
            subprocess.run(["fusermount3", "-u", str(ws.mnt)], check=False)


def test_a_killed_daemon_is_reported_dead_and_umount_succeeds(workspace: Workspace) -> None:
    ws = workspace
    with background_mount(ws):
        state = mounts.load_state(ws.mnt.resolve())
        assert state is not None
        os.kill(state.pid, signal.SIGKILL)
        assert wait_until(lambda: not mounts.process_exists(state.pid), 10)
        status = cowfs("status")
        assert status.status == 0, status
        assert f"{ws.mnt.resolve()}  (pid {state.pid}, dead)" in status.out, status.out
        assert "Transport endpoint is not connected" in status.out, status.out
        assert "cowfs umount" in status.out
        unmounted = cowfs("umount", ws.mnt)
        assert unmounted.status == 0, unmounted
        assert f"(pid {state.pid}) had died" in unmounted.err
        assert mounted_fstype(ws.mnt) is None
        assert str(ws.mnt) not in cowfs("status").out


def test_a_background_mount_logs_to_a_file_by_default(workspace: Workspace) -> None:
    ws = workspace
    log = mounts.log_file(ws.mnt.resolve())
    with background_mount(ws) as err:
        assert err == ""
        assert wait_until(lambda: log.exists() and "mounted" in log.read_text(), 10)
        assert f"  log:     {log}\n" in cowfs("status").out
        assert cowfs("umount", ws.mnt).status == 0
    assert "unmounted" in log.read_text()
    assert log.parent == Path(os.environ[mounts.STATE_DIR_ENV])


def test_a_second_commit_of_an_upper_names_the_first(workspace: Workspace) -> None:
    ws = workspace
    with background_mount(ws):
        (ws.mnt / "new.txt").write_text("x")
        assert cowfs("umount", ws.mnt).status == 0
    first = subprocess.Popen(  # stops itself (SIGSTOP) after its first step, holding the lock
        [str(find_cowfs()), "commit", str(ws.upper), "--into", str(ws.base), "--yes"],
        env={**os.environ, "COWFS_TEST_COMMIT_FAULT": "1:STOP"}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _stopped(first.pid), 30)
        second = cowfs("commit", ws.upper, "--into", ws.base, "--yes")
        assert second.status == 1, second
        assert f"another cowfs commit (pid {first.pid}) is working on" in second.err, second.err
        assert "in use by a cowfs mount" not in second.err
    finally:
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=60) == 0
    assert (ws.base / "new.txt").read_text() == "x"


def test_a_session_keeps_its_state_to_itself(workspace: Workspace, tmp_path: Path) -> None:
    """A mount started with another state directory (another session, or the machine's
    /run/cowfs) is not one of this session's mounts; its state file is in its own directory."""
    ws = workspace
    other = tmp_path / "other-state"
    env = {**os.environ, mounts.STATE_DIR_ENV: str(other)}
    mounted = subprocess.run([str(find_cowfs()), "mount", str(ws.base), str(ws.upper),
                              str(ws.mnt)], env=env, capture_output=True, text=True,
                             check=False, timeout=60)
    try:
        assert mounted.returncode == 0, mounted
        name = mounts.state_file(ws.mnt.resolve()).name
        assert (other / name).is_file()
        assert not (Path(os.environ[mounts.STATE_DIR_ENV]) / name).exists()
        assert not (Path("/run/cowfs") / name).exists()
        assert f"{ws.mnt.resolve()}  (no state file)" in cowfs("status").out
        # The mount table decides what covers a path, whichever state directory recorded it.
        (ws.root / "u2").mkdir()
        os.setxattr(ws.root / "u2", schema.XATTR_FORMAT, schema.FORMAT_VERSION)
        refused = cowfs("commit", ws.root / "u2", "--into", ws.mnt / "dir", "--yes")
        assert refused.status == 1
        assert f"is under the cowfs mount at '{ws.mnt.resolve()}'" in refused.err, refused.err
    finally:
        if mounted_fstype(ws.mnt) is not None:
            subprocess.run([str(find_cowfs()), "umount", str(ws.mnt)], env=env, check=False)
    assert not (other / name).exists()
    assert os.getxattr(ws.upper, schema.XATTR_FORMAT) == schema.FORMAT_VERSION


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2] == "T"
