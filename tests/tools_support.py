"""Helpers for the tests of the offline tools and ``cowfs run`` (test_tools_*.py, test_api.py).

The layer builders, snapshots and mount managers come from support.py; this module adds running
the ``cowfs`` command with its output in files, a standard scenario of changes made through a real
mount, and fixtures shared by the tool tests (imported by them explicitly).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import (
    Entry,
    assert_same_tree,
    build_layer,
    cowfs_mount,
    find_cowfs,
    merged_view,
    mounted_fstype,
    tree_state,
)

#: The base every scenario starts from; file contents name their layer and path.
BASE_SPEC = {
    "a.txt": None,
    "b.txt": None,
    "same.txt": None,
    "mode.txt": None,
    "dir/x": None,
    "dir/sub/deep": None,
    "old/inner/z": None,
    "old/keep": None,
    "opq/gone1": None,
    "opq/gone2": None,
    "kind": None,
    "link@": "a.txt",
    "hard/one": None,
}


@dataclass(frozen=True, slots=True)
class Result:
    status: int
    out: str
    err: str


def cowfs(*args: str | Path, timeout: float = 60, stdin: bytes | None = None,
          cwd: Path | None = None, env: dict[str, str] | None = None) -> Result:
    """Run ``cowfs ARGS`` with stdout/stderr in files (a daemon keeping a pipe open cannot hang
    the test) and no terminal, as a script would; ``env``: variables to add (the test seams)."""
    cmd = [str(find_cowfs()), *map(str, args)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        status = subprocess.run(
            cmd, input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
            stdout=out, stderr=err, timeout=timeout, check=False, cwd=cwd,
            env={**os.environ, **env} if env else None).returncode
        out.seek(0)
        err.seek(0)
        return Result(status, out.read().decode(errors="replace"),
                      err.read().decode(errors="replace"))


def assert_user_error(result: Result, *fragments: str) -> None:
    """A user error: non-zero status, one line on stderr, no traceback."""
    assert result.status != 0, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("cowfs: error: "), result.err
    assert "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@dataclass(slots=True)
class Workspace:
    root: Path
    base: Path
    upper: Path
    mnt: Path

    def fresh(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    """A base built from BASE_SPEC, an empty upper and a mount point; the base's state is
    checked at teardown to be what the test says (tests that commit into it opt out by
    replacing ``ws.base`` with None in ``base_must_stay``)."""
    base = build_layer(tmp_path / "base", BASE_SPEC, "base")
    os.link(base / "hard/one", base / "hard/two")
    upper = tmp_path / "upper"
    upper.mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    yield Workspace(tmp_path, base, upper, mnt)
    assert mounted_fstype(mnt) is None, "a test left its mount behind"


def make_changes(view: Path) -> None:
    """The standard scenario, through a mount: one change of every kind the walk reports."""
    (view / "new.txt").write_text("new file\n")
    with open(view / "a.txt", "a") as f:
        f.write("appended\n")
    (view / "b.txt").unlink()
    os.chmod(view / "mode.txt", 0o600)
    (view / "same.txt").open("r+").close()  # opened for writing, nothing written
    shutil.rmtree(view / "dir/sub")
    os.rename(view / "old", view / "renamed")
    shutil.rmtree(view / "opq")
    (view / "opq").mkdir()
    (view / "opq/fresh").write_text("fresh\n")
    (view / "kind").unlink()
    (view / "kind").mkdir()
    (view / "newdir/nested").mkdir(parents=True)
    os.link(view / "new.txt", view / "newdir/nested/hardlink")
    os.symlink("new.txt", view / "newlink")
    os.setxattr(view / "dir/x", "user.comment", b"hello")
    (view / "renamed/added").write_text("in a renamed dir\n")


#: What ``cowfs diff`` prints for make_changes, in order.
GOLDEN_TEXT = """\
M  a.txt
D  b.txt
D  dir/sub/
m  dir/x
T  kind/ (file -> dir)
m  mode.txt
A  new.txt
A  newdir/
A  newdir/nested/
A  newdir/nested/hardlink
A  newlink
O  opq/
A  opq/fresh
R  old/ -> renamed/
A  renamed/added
"""


def view_of(lowers: list[Path], upper: Path, mnt: Path) -> dict[str, Entry]:
    """The merged view of a stack, mounted for the snapshot only."""
    with cowfs_mount(lowers, upper, mnt):
        return merged_view(mnt)


def stack_view(stack: Path, mnt: Path) -> dict[str, object]:
    """A layer stack's merged view through ``cowfs mount STACK MNT`` (always unmounted)."""
    mnt.mkdir(exist_ok=True)
    mounted = cowfs("mount", stack, mnt)
    assert mounted.status == 0, mounted
    try:
        return dict(merged_view(mnt))
    finally:
        unmounted = cowfs("umount", mnt)
        assert unmounted.status == 0, unmounted


@contextlib.contextmanager
def unchanged(path: Path, what: str) -> Iterator[None]:
    """Assert that nothing under ``path`` changes in the block (ctime included)."""
    before = tree_state(path)
    yield
    assert_same_tree(before, tree_state(path), what)
