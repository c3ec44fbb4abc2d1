"""The offline commands on a tree 10,000 directories deep (a plain user's ``mv`` loop makes one by
accident): ``diff``, ``check``, ``export``, ``import``, ``commit`` and ``reset`` each finish, under
a descriptor limit of 1,024 and with paths far past ``PATH_MAX``, and do what they do on a
shallow tree.

The trees are built and read with ``*at`` calls from descriptors (a path string that long is
refused by the kernel) and removed by each test (pytest's own cleanup recurses)."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from tools_support import Result, Workspace, cowfs, workspace

from cowfs.core import schema
from cowfs.tools import plans

__all__ = ["workspace"]

DEPTH = 10_000
#: The descriptor limit the commands run under: a walk that kept one per level would fail.
FD_LIMIT = 1024


def build_deep(root: Path, depth: int = DEPTH, name: str = "d") -> None:
    """``root/d/d/.../d/leaf`` (``depth`` directories), made from descriptors."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        leaf = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(leaf, b"at the bottom\n")
        os.close(leaf)
    finally:
        os.close(fd)


def depth_of(root: Path, name: str = "d") -> tuple[int, bytes | None]:
    """How many ``name`` directories are nested under ``root``, and the bottom's ``leaf``."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        while True:
            try:
                child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                break
            os.close(fd)
            fd = child
            depth += 1
        try:
            leaf = os.open("leaf", os.O_RDONLY, dir_fd=fd)
        except FileNotFoundError:
            return depth, None
        with os.fdopen(leaf, "rb") as f:
            return depth, f.read()
    finally:
        os.close(fd)


@contextlib.contextmanager
def fd_limit(limit: int = FD_LIMIT) -> Iterator[None]:
    """The commands started in the block inherit a soft descriptor limit of ``limit``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def run(*args: str | Path) -> Result:
    with fd_limit():
        return cowfs(*args, timeout=600)


def ok(result: Result) -> Result:
    assert result.status == 0, (result.status, result.err[-2000:])
    assert "Traceback" not in result.err
    return result


@pytest.fixture
def deep(workspace: Workspace) -> Iterator[Workspace]:
    """The workspace with ``upper/d/.../d/leaf`` 10,000 levels deep, a cowfs upper; every deep
    tree under the workspace is removed at the end."""
    build_deep(workspace.upper)
    os.setxattr(workspace.upper, schema.XATTR_FORMAT, schema.FORMAT_VERSION)
    try:
        yield workspace
    finally:
        for child in workspace.root.iterdir():
            plans.remove_path(child)


def test_diff_check_export_and_import_of_a_deep_upper(deep: Workspace) -> None:
    ws = deep
    diff = ok(run("diff", "--lower", ws.base, ws.upper)).out.splitlines()
    assert len(diff) == DEPTH + 1
    assert diff[0] == "A  d/"
    assert diff[-1] == "A  " + "d/" * DEPTH + "leaf"
    assert "no problems" in ok(run("check", "--lower", ws.base, ws.upper)).out
    tar = ws.root / "layer.tar"
    ok(run("export", "--lower", ws.base, ws.upper, "-o", tar))
    imported = ws.root / "imported"
    assert f"imported {DEPTH + 1} members" in ok(run("import", tar, imported)).err
    assert depth_of(imported) == (DEPTH, b"at the bottom\n")


def test_commit_and_reset_of_a_deep_upper(deep: Workspace) -> None:
    ws = deep
    # The upper was made by hand, without a stack record: --relocate says the base is its own.
    assert f"{DEPTH + 1} added" in ok(run("commit", ws.upper, "--into", ws.base, "--yes",
                                          "--relocate")).out
    assert depth_of(ws.base) == (DEPTH, b"at the bottom\n")
    assert set(os.listdir(ws.upper)) <= {schema.WORK_DIR_NAME}
    assert not any(name.startswith(".cowfs-commit") for name in os.listdir(ws.base))

    build_deep(ws.upper, name="e")
    ok(run("reset", ws.upper, "e/e/e", "--yes"))
    assert depth_of(ws.upper, "e") == (2, None)
    build_deep(ws.upper, name="f")
    ok(run("reset", ws.upper, "--yes"))
    assert set(os.listdir(ws.upper)) <= {schema.WORK_DIR_NAME}
