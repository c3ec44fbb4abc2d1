"""Feedback on long work (issue 13): progress bars of bytes on a terminal only, what Ctrl-C says
and leaves, the summary of a long commit plan, ``cowfs run``'s summary and ``--diff-out``, and
the path filters of ``cowfs diff``.

The terminal is a real pseudo-terminal (:func:`on_terminal`); Ctrl-C is the byte ``\\x03`` typed
into it, so the kernel's line discipline sends SIGINT to the foreground process group, as it does
for a person at a keyboard.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import termios
import time
from dataclasses import dataclass
from pathlib import Path

from support import cowfs_mount, find_cowfs
from tools_support import Workspace, assert_user_error, cowfs, workspace

from cowfs.tools.changes import select as select_changes
from cowfs.tools.walk import Added, Deleted, Kind, Renamed

__all__ = ["workspace"]

#: What a tqdm bar of bytes looks like: "export:  13%|███   | 57.9M/450M [00:00<00:01, 304MiB/s]".
BAR = re.compile(r"(export|import|commit): +\d+%\|.*\| [\d.]+[KMG]?/([\d.]+[KMG]?) \[")


@dataclass(frozen=True, slots=True)
class Terminal:
    status: int
    output: str  # stdout and stderr, as the terminal showed them (\r kept)


def _wait_until_reading(pid: int) -> None:
    """Until ``pid`` sleeps in a terminal read. A question is printed just before the read, and
    a Ctrl-C that came in between would only set Python's flag, with nothing to look at it until
    the read returns: a race a person at a keyboard never wins, but a test would."""
    for _ in range(2000):
        with open(f"/proc/{pid}/wchan") as f:
            if f.read() == "wait_woken":
                return
        time.sleep(0.01)  # polling a state, not timing anything
    raise AssertionError(f"cowfs (pid {pid}) never waited for the terminal")


def _wait_until_running(session: int, name: str) -> None:
    """Until a process called ``name`` runs in ``session``. Ctrl-C typed while a shell is between
    ``echo ready`` and starting its next command reaches only the shell, which waits for that
    command (sleep 60) to end before it dies of the signal: the test would take a minute."""
    for _ in range(2000):
        for stat_file in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                comm, rest = stat_file.read_text().rsplit(")", 1)
                if comm.split("(", 1)[1] == name and int(rest.split()[3]) == session:
                    return
        time.sleep(0.01)  # polling a state, not timing anything
    raise AssertionError(f"no {name} process ever ran on the terminal of session {session}")


def on_terminal(*args: str | Path, interrupt_at: str | None = None, at_question: bool = False,
                at_command: str | None = None, cwd: Path | None = None) -> Terminal:
    """``cowfs ARGS`` on a pseudo-terminal of 100x30; with ``interrupt_at``, Ctrl-C is typed once
    that text has appeared (``at_question``: and cowfs waits for an answer; ``at_command``: and
    a process of that name runs on the terminal)."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal is its stdin, stdout and stderr
        try:
            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
            # As an interactive shell starts a command: a test runner started in the background
            # may have SIGINT ignored, which exec would pass on.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            if cwd is not None:
                os.chdir(cwd)
            os.execv(str(find_cowfs()), ["cowfs", *map(str, args)])
        finally:
            os._exit(127)
    output = b""
    sent = False
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], 60)
            if not ready:
                raise AssertionError(f"cowfs {args} printed nothing for 60 s:\n{output!r}")
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not chunk:
                break
            output += chunk
            if interrupt_at is not None and not sent and interrupt_at.encode() in output:
                if at_question:
                    _wait_until_reading(pid)
                if at_command is not None:
                    _wait_until_running(pid, at_command)
                os.write(fd, b"\x03")
                sent = True
        _, status = os.waitpid(pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(fd)
    assert interrupt_at is None or sent, f"{interrupt_at!r} never appeared:\n{output!r}"
    return Terminal(os.waitstatus_to_exitcode(status), output.decode(errors="replace"))


def bar_totals(output: str) -> set[str]:
    return {m.group(2) for m in BAR.finditer(output)}


def _upper_with(ws: Workspace, files: dict[str, int], sparse: bool = False) -> None:
    """Files of the given sizes, made through a mount (sparse: only the size is set)."""
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        for name, size in files.items():
            path = ws.mnt / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                if sparse:
                    f.truncate(size)
                else:
                    f.write(os.urandom(size))


# --- progress bars ------------------------------------------------------------------------------


def test_export_import_and_commit_show_a_bar_of_bytes_on_a_terminal_only(
        workspace: Workspace) -> None:
    ws = workspace
    _upper_with(ws, {"big.bin": 3 << 20, "small/one": 10, "small/two": 20})
    out = ws.fresh("out")

    shown = on_terminal("export", ws.upper, "-o", out / "on-tty.tar")
    assert shown.status == 0, shown.output
    # 3 MiB of big.bin, 30 bytes in small/, nothing for the base's files: bytes, not entries.
    assert bar_totals(shown.output) == {"3.00M"}, shown.output
    assert "iB/s" in shown.output
    piped = cowfs("export", ws.upper, "-o", out / "piped.tar")
    assert piped.status == 0, piped
    assert not BAR.search(piped.err), piped.err
    assert "\r" not in piped.err

    shown = on_terminal("import", out / "on-tty.tar", out / "layer-tty")
    assert shown.status == 0, shown.output
    archive_size = (out / "on-tty.tar").stat().st_size  # the archive's bytes, headers included
    assert bar_totals(shown.output) == {f"{archive_size / (1 << 20):.2f}M"}, shown.output
    piped = cowfs("import", out / "piped.tar", out / "layer-piped")
    assert piped.status == 0, piped
    assert not BAR.search(piped.err), piped.err
    assert "\r" not in piped.err

    shown = on_terminal("commit", ws.upper, "--into", ws.base, "--yes")
    assert shown.status == 0, shown.output
    assert bar_totals(shown.output) == {"3.00M"}, shown.output
    assert (ws.base / "big.bin").stat().st_size == 3 << 20


def test_a_commit_without_a_terminal_shows_no_bar(workspace: Workspace) -> None:
    ws = workspace
    _upper_with(ws, {"big.bin": 1 << 20})
    result = cowfs("commit", ws.upper, "--into", ws.base, "--yes")
    assert result.status == 0, result
    assert not BAR.search(result.out + result.err)
    assert "\r" not in result.out + result.err


# --- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_during_export_says_so_and_leaves_no_file(workspace: Workspace) -> None:
    ws = workspace
    _upper_with(ws, {"huge.bin": 2 << 30}, sparse=True)
    out = ws.fresh("out")
    shown = on_terminal("export", ws.upper, "-o", out / "layer.tar", interrupt_at="export:")
    assert shown.status == 130, shown.output
    assert "Traceback" not in shown.output
    assert "export interrupted (SIGINT)" in shown.output, shown.output
    assert "was not written" in shown.output
    assert os.listdir(out) == []


def test_ctrl_c_during_commit_says_how_to_resume(workspace: Workspace) -> None:
    ws = workspace
    _upper_with(ws, {"huge.bin": 1 << 30, "zz-after.txt": 5}, sparse=True)
    shown = on_terminal("commit", ws.upper, "--into", ws.base, "--yes", interrupt_at="commit:")
    assert shown.status == 130, shown.output
    assert "Traceback" not in shown.output
    text = " ".join(shown.output.split())
    assert "interrupted (SIGINT)" in text, text
    assert "half-committed" in text, text
    assert "run the same command again" in text
    assert f"cowfs commit {ws.upper} --into {ws.base} --yes" in text, text
    assert (ws.base / ".cowfs-commit").is_dir()  # the journal, to resume from
    assert not (ws.base / "zz-after.txt").exists()
    resumed = cowfs("commit", ws.upper, "--into", ws.base, "--yes")
    assert resumed.status == 0, resumed
    assert (ws.base / "huge.bin").stat().st_size == 1 << 30
    assert (ws.base / "zz-after.txt").stat().st_size == 5
    assert not (ws.base / ".cowfs-commit").exists()


def test_ctrl_c_at_the_commit_question_changes_nothing(workspace: Workspace) -> None:
    ws = workspace
    _upper_with(ws, {"new.txt": 5})
    before = sorted(os.listdir(ws.base))
    shown = on_terminal("commit", ws.upper, "--into", ws.base, interrupt_at="[y/N]",
                        at_question=True)
    assert shown.status == 130, shown.output
    assert "Traceback" not in shown.output
    assert "cowfs: interrupted (Ctrl-C); nothing was changed" in shown.output, shown.output
    assert sorted(os.listdir(ws.base)) == before
    assert (ws.upper / "new.txt").exists()


def test_ctrl_c_in_run_reaches_the_command_and_the_view_is_discarded(
        workspace: Workspace) -> None:
    ws = workspace
    shown = on_terminal("run", ws.base, "--", "sh", "-c",
                        "touch partial; echo ready; sleep 60", interrupt_at="ready",
                        at_command="sleep")
    assert shown.status == 130, shown.output
    assert "Traceback" not in shown.output
    assert "cowfs run: sh ended by SIGINT; the view was unmounted" in shown.output
    assert "cowfs run: 1 added; discarded" in shown.output
    assert not (ws.base / "partial").exists()


# --- the summary of a long commit plan -----------------------------------------------------------


def test_a_long_commit_plan_is_summarised_and_shown_whole_on_request(
        workspace: Workspace) -> None:
    ws = workspace
    files = {f"many/f{i:02}": 10 for i in range(30)}
    files["many/largest.bin"] = 200_000
    _upper_with(ws, files)
    dry = cowfs("commit", ws.upper, "--into", ws.base, "--dry-run")
    assert dry.status == 0, dry
    assert all(f"write   {name}" in dry.out for name in files), dry.out
    yes = cowfs("commit", ws.upper, "--into", ws.base, "--yes")
    assert yes.status == 0, yes
    lines = yes.out.splitlines()
    assert len(lines) < 15, yes.out
    assert "33 steps (1 create, 31 write, 1 attrs)" in yes.out, yes.out
    assert "195.6 KiB of file data" in yes.out
    assert "largest files:" in yes.out
    assert "many/largest.bin" in yes.out
    assert "--dry-run or --verbose" in yes.out
    assert "many/f17" not in yes.out
    assert (ws.base / "many/f17").exists()


def test_commit_verbose_shows_the_whole_plan(workspace: Workspace) -> None:
    ws = workspace
    files = {f"many/f{i:02}": 10 for i in range(30)}
    _upper_with(ws, files)
    result = cowfs("commit", ws.upper, "--into", ws.base, "--yes", "--verbose")
    assert result.status == 0, result
    assert all(f"write   {name}" in result.out for name in files), result.out


# --- cowfs run: summary and --diff-out ----------------------------------------------------------


def test_run_counts_by_kind_and_writes_every_change_with_diff_out(workspace: Workspace) -> None:
    ws = workspace
    out = ws.fresh("out")
    script = "mkdir gen && for i in $(seq 30); do echo $i > gen/f$i; done; rm a.txt; touch x.pyc"
    result = cowfs("run", "--diff-out", out / "all.json", "--exclude", "*.pyc", ws.base, "--",
                   "sh", "-c", script)
    assert result.status == 0, result
    assert "... and 12 more" in result.err, result.err
    assert "x.pyc" not in result.err
    assert "cowfs run: 31 added, 1 deleted (1 more excluded); discarded" in result.err
    document = json.loads((out / "all.json").read_text())
    paths = {c["path"] for c in document["changes"]}
    assert paths == {"gen", "a.txt", *(f"gen/f{i}" for i in range(1, 31))}
    assert document["summary"]["added"] == 31
    assert not (ws.base / "gen").exists()  # discarded, and the base untouched

    text = cowfs("run", "--diff-out", out / "all.txt", ws.base, "--", "sh", "-c", script)
    assert text.status == 0, text
    assert "(all of them: --diff-out FILE)" not in text.err
    assert "A  gen/f30\n" in (out / "all.txt").read_text()
    assert "A  x.pyc\n" in (out / "all.txt").read_text()

    short = cowfs("run", ws.base, "--", "sh", "-c", script)
    assert "... and 13 more (all of them: --diff-out FILE)" in short.err, short.err


def test_run_refuses_a_diff_out_inside_the_base_before_running(workspace: Workspace) -> None:
    ws = workspace
    marker = ws.root / "ran"
    result = cowfs("run", "--diff-out", ws.base / "changes.txt", ws.base, "--", "touch", marker)
    assert_user_error(result, "--diff-out", "inside the base")
    assert not marker.exists()
    missing = cowfs("run", "--diff-out", ws.root / "nowhere/x.txt", ws.base, "--", "touch",
                    marker)
    assert_user_error(missing, "--diff-out", "does not exist")
    assert not marker.exists()


# --- cowfs diff PATH... --exclude ----------------------------------------------------------------


def test_diff_selects_paths_and_excludes_patterns(workspace: Workspace) -> None:
    ws = workspace
    _upper_with(ws, {"src/main.py": 3, "src/main.pyc": 3, "docs/api/x.md": 3, "docs/other": 3,
                     ".git/objects/ab/cdef": 3})

    def listed(*args: str) -> list[str]:
        result = cowfs("diff", ws.upper, *args)
        assert result.status == 0, result
        return [line[3:] for line in result.out.splitlines()]

    assert listed("src") == ["src/", "src/main.py", "src/main.pyc"]
    assert listed("src/main.py", "docs/api") == ["docs/api/", "docs/api/x.md", "src/main.py"]
    assert listed("/docs/api/", "--exclude", "*.md") == ["docs/api/"]
    assert ".git/objects/ab/cdef" not in listed("--exclude", ".git")
    assert [p for p in listed("--exclude", ".git", "--exclude", "*.pyc") if "pyc" in p] == []
    assert listed("--", "src") == listed("src")
    as_json = json.loads(cowfs("diff", ws.upper, "docs", "--json").out)
    assert as_json["summary"]["added"] == 4  # docs/ docs/api/ docs/api/x.md docs/other
    assert_user_error(cowfs("diff", ws.upper, "../etc"), "leaves the layer")


def test_select_matches_parents_names_and_renamed_sources() -> None:
    records = [Added("a/b/c.txt", Kind.FILE), Deleted("x/.git/obj", Kind.FILE),
               Renamed("new", "old"), Added("top.pyc", Kind.FILE)]
    assert select_changes(records, ["a"]) == records[:1]
    assert select_changes(records, ["old"]) == [records[2]]  # by its old name too
    assert select_changes(records, [], [".git"]) == [records[0], records[2], records[3]]
    assert select_changes(records, [], ["*.pyc"]) == records[:3]
    assert select_changes(records, [], ["a/b"]) == records[1:]
    assert select_changes(records, ["."], []) == records
    assert select_changes(records, ["a/b/c.txt/"[:-1]]) == records[:1]
