"""Real tools on cowfs and on the kernel's overlayfs over the same base, with the same result:
git, tar + diff -r, cp -a, rsync -aH, a Python venv with a package from a local wheel, SQLite in
WAL mode, and make building a small C project.

Each tool runs once per side with the same command and environment (fixed dates, so that git's
objects are identical); its output and exit status must match, and so must the merged views,
except where a tool writes inode numbers, stat times or absolute paths into a file (named per
test). The lower layers must be unchanged (started_pair checks it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conformance_support import Pair, Sparse, reference, started_pair, view
from support import Dir, File, assert_same_tree

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": "/nonexistent",
    "LC_ALL": "C",
    "TZ": "UTC",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
    "GIT_AUTHOR_DATE": "2001-09-09T01:46:40Z",
    "GIT_COMMITTER_DATE": "2001-09-09T01:46:40Z",
    "PIP_NO_INDEX": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def sh(cmd: Sequence[str] | str, cwd: Path, *, check: bool = True) -> tuple[int, str]:
    """Run a command (a string goes to bash), returning (status, stdout+stderr)."""
    args: Any = ["bash", "-euo", "pipefail", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    result = subprocess.run(
        args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300, check=False
    )
    out = result.stdout + result.stderr
    assert not check or result.returncode == 0, f"{cmd} in {cwd} failed:\n{out}"
    return result.returncode, out


def both(pair: Pair, cmd: Sequence[str] | str, sub: str = ".") -> str:
    """Run ``cmd`` in ``sub`` of each mount; the outputs must be the same (with the mount path
    replaced by <mnt>)."""
    outs = []
    for mnt in (pair.kernel, pair.cowfs):
        status, out = sh(cmd, mnt / sub)
        outs.append((status, out.replace(str(mnt), "<mnt>")))
    assert outs[0] == outs[1], f"{cmd}: kernel {outs[0]!r}\ncowfs {outs[1]!r}"
    return outs[1][1]


def same_views(pair: Pair, *, volatile: Sequence[str] = (), names_only: Sequence[str] = ()) -> None:
    """The merged views are equal, except: the content of ``volatile`` files (which hold inode
    numbers or stat times), and below each of ``names_only`` only names, kinds and modes count
    (files there hold absolute paths or build times)."""

    def normalise(entries: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for rel, e in entries.items():
            if rel in volatile:
                e = e.__class__(**{**_fields(e), "sha256": None, "size": None, "mtime_ns": None})
            elif any(rel == n or rel.startswith(n + "/") for n in names_only):
                e = (e.kind, e.mode)
            out[rel] = e
        return out

    assert_same_tree(
        normalise(view(pair.kernel)),
        normalise(view(pair.cowfs)),
        "merged views",
        ("kernel", "cowfs"),
    )
    pair.assert_lowers_unchanged()


def _fields(entry: Any) -> dict[str, Any]:
    return {f: getattr(entry, f) for f in entry.__slots__}


@pytest.fixture
def make_pair(tmp_path: Path) -> Iterator[Any]:
    """``make_pair(lowers, **kwargs)``: a started pair (at most one per test), always unmounted."""
    with contextlib.ExitStack() as stack:

        def start(lowers: list[dict[str, Any]], **kwargs: Any) -> Pair:
            base = tmp_path / "pair"
            base.mkdir()
            return stack.enter_context(started_pair(base, lowers, **reference(), **kwargs))

        yield start


# --- git ---------------------------------------------------------------------------------------


def git_base(root: Path) -> Path:
    """A repository with two branches and a few commits, built natively: the lower layer."""
    root.mkdir()
    script = """
        git init -q -b main .
        printf 'one\\n' > a.txt; mkdir -p src/deep; printf 'x\\n' > src/deep/x.c
        printf 'bin\\n' > tool.sh; chmod +x tool.sh; ln -s a.txt link
        git add -A; git commit -q -m first
        git checkout -q -b other; printf 'other\\n' > other.txt; git rm -q src/deep/x.c
        git add -A; git commit -q -m 'on other'
        git checkout -q main; printf 'two\\n' >> a.txt; git commit -q -am second
    """
    sh(script, root)
    return root


def test_git_status_commit_checkout_gc(tmp_path: Path, make_pair: Any) -> None:
    base = git_base(tmp_path / "repo")
    # A lower layer that is the repository itself: pass it as a prebuilt directory.
    pair = make_pair([], prebuilt_lowers=[base])
    both(pair, "git status --porcelain=v1 -b")
    both(pair, "printf 'three\\n' >> a.txt; echo new > new.txt; git add -A; git commit -q -m third")
    both(pair, "git status --porcelain=v1 -b; git log --format='%H %s' --all")
    both(pair, "git checkout -q other; ls -A; git status --porcelain=v1 -b")
    both(
        pair,
        "git checkout -q main; git branch -D other -q; git gc -q --prune=now; "
        "git fsck --no-progress",
    )
    both(pair, "git log --format='%H %s' --all; git count-objects -v | grep -v size")
    same_views(pair, volatile=[".git/index"])
    pair.run(("remount",))
    both(pair, "git status --porcelain=v1 -b; git fsck --no-progress")
    same_views(pair, volatile=[".git/index"])


# --- trees: tar, cp -a, rsync -aH ----------------------------------------------------------------


def source_tree(root: Path) -> Path:
    """A tree with hard links, symlinks, a sparse file, odd modes and fixed times."""
    root.mkdir()
    script = """
        mkdir -p src/a/b empty private
        printf 'hello\\n' > src/a/hello.txt; ln src/a/hello.txt src/a/b/hardlink
        ln src/a/hello.txt top-link
        seq 1 20000 > src/numbers; ln -s ../numbers src/a/numbers.link; ln -s /nowhere dangling
        truncate -s 3M sparse
        printf 'mid' | dd of=sparse bs=1 seek=1500000 conv=notrunc status=none
        printf 'x' > src/a/b/exec; chmod 4755 src/a/b/exec; chmod 700 private
        printf 'secret' > private/key; chmod 600 private/key; mkfifo src/fifo
        setfattr -n user.note -v kept src/a/hello.txt
        find . -exec touch -h -d 2003-03-03T03:03:03Z {} +
    """
    sh(script, root)
    return root


#: What the base already holds where the trees are unpacked: older versions of some of the names.
OLD_TREE = {
    "dest/src/numbers": File(b"old numbers\n"),
    "dest/src/a/hello.txt": File(b"old hello\n"),
    "dest/sparse": Sparse(4096, ((0, b"old"),)),
    "dest/stale": File(b"only in the base\n"),
    "dest/private": Dir(mode=0o755),
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return source_tree(tmp_path / "tree")


def test_tar_extract_then_diff_against_the_source(
    tmp_path: Path, tree: Path, make_pair: Any
) -> None:
    tarball = tmp_path / "tree.tar"
    sh(["tar", "-C", str(tree), "--xattrs", "-cSf", str(tarball), "."], tmp_path)
    pair = make_pair([OLD_TREE])
    both(pair, f"tar -C dest --xattrs --xattrs-include='user.*' -xpSf {tarball}")
    both(pair, f"diff -r --no-dereference {tree} dest | grep -v '^Only in dest: stale$' || true")
    both(pair, "cmp dest/src/a/hello.txt dest/src/a/b/hardlink; stat -c '%h %s' dest/top-link")
    same_views(pair)
    pair.run(("remount",))
    same_views(pair)


def test_cp_a_keeps_hard_links_sparse_files_and_metadata(tree: Path, make_pair: Any) -> None:
    pair = make_pair([OLD_TREE])
    both(pair, f"cp -a {tree}/. dest/")
    both(pair, "stat -c '%n %h %a %s' dest/top-link dest/src/a/b/hardlink dest/sparse dest/private")
    both(pair, f"diff -r --no-dereference {tree} dest | grep -v '^Only in dest: stale$' || true")
    # diff reports FIFOs as differing even when both are FIFOs: leave them out.
    both(pair, "cp -a dest copy && diff -r --no-dereference -x fifo dest copy && echo same")
    same_views(pair)
    pair.run(("remount",))
    same_views(pair)


@pytest.fixture(scope="session")
def rsync() -> str:
    """rsync, installed from Debian's packages when missing (make setup does not need it)."""
    if shutil.which("rsync") is None:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "rsync"]
        if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=False)
            subprocess.run(install, env=env, capture_output=True, check=False)
    path = shutil.which("rsync")
    if path is None:
        pytest.fail("rsync is missing and apt-get could not install it", pytrace=False)
    return path


def test_rsync_a_hard_links_into_the_mount(tree: Path, make_pair: Any, rsync: str) -> None:
    pair = make_pair([OLD_TREE])
    both(pair, f"{rsync} -aHSX --delete {tree}/ dest/")
    both(pair, f"{rsync} -aHSX --delete --itemize-changes --dry-run {tree}/ dest/ | sort")
    both(pair, f"diff -r --no-dereference {tree} dest || true")
    both(pair, "stat -c '%n %h' dest/top-link dest/src/a/b/hardlink; ls dest")
    same_views(pair)
    pair.run(("remount",))
    same_views(pair)


# --- a Python venv and a package from a local wheel ----------------------------------------------


def tiny_wheel(directory: Path) -> Path:
    """A pure-Python wheel built by hand (a zip with a dist-info): no build tools, no network."""
    name = "cowfs_tiny"
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "def hello():\n    return 'hello from cowfs_tiny'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
        f"{dist}/entry_points.txt": f"[console_scripts]\ntiny-hello = {name}:hello\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{dist}/RECORD", record)
    return wheel


def test_a_venv_in_the_mount_with_a_package_from_a_local_wheel(
    tmp_path: Path, make_pair: Any
) -> None:
    wheel = tiny_wheel(tmp_path)
    python = Path(sys.executable).resolve()
    base = getattr(sys, "_base_executable", str(python))
    pair = make_pair([{"project/README": File(b"a project\n")}])
    both(pair, [base, "-m", "venv", "venv"], "project")
    both(
        pair, ["venv/bin/python", "-m", "pip", "install", "-q", "--no-index", str(wheel)], "project"
    )
    out = both(pair, "venv/bin/python -c 'import cowfs_tiny; print(cowfs_tiny.hello())'", "project")
    assert out == "hello from cowfs_tiny\n"
    both(pair, "venv/bin/python -m pip list --format=freeze | grep -i tiny", "project")
    both(
        pair,
        "venv/bin/python -m pip uninstall -q -y cowfs_tiny; ls venv/lib/*/site-packages | sort",
        "project",
    )
    # Scripts and pyvenv.cfg hold the venv's absolute path, .pyc files the sources' mtimes.
    same_views(pair, names_only=["project/venv"])


# --- SQLite in WAL mode ------------------------------------------------------------------------


def sqlite_base(root: Path) -> Path:
    root.mkdir()
    script = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("create table t (k integer primary key, v text)")
db.executemany("insert into t values (?, ?)", [(i, "v%d" % i * 20) for i in range(3000)])
db.commit()
db.close()
"""
    sh([sys.executable, "-c", script, str(root / "data.db")], root)
    return root


SQLITE_WORK = """
import sqlite3
db = sqlite3.connect("data.db")
print(db.execute("pragma journal_mode=wal").fetchone())
for i in range(50):
    db.execute("update t set v = ? where k % 50 = ?", ("changed%d" % i, i))
    db.execute("insert into t (v) values (?)", ("new%d" % i,))
    db.commit()
other = sqlite3.connect("data.db")
print(other.execute("select count(*), sum(length(v)) from t").fetchone())
db.execute("delete from t where k < 100"); db.commit()
print(other.execute("select count(*) from t").fetchone())
print(db.execute("pragma integrity_check").fetchone())
print(db.execute("pragma wal_checkpoint(truncate)").fetchone())
other.close(); db.close()
"""


def test_sqlite_in_wal_mode(tmp_path: Path, make_pair: Any) -> None:
    pair = make_pair([], prebuilt_lowers=[sqlite_base(tmp_path / "db")])
    out = both(pair, [sys.executable, "-c", SQLITE_WORK])
    assert "('wal',)" in out
    assert "('ok',)" in out
    dump = "import sqlite3; print('\\n'.join(sqlite3.connect('data.db').iterdump()))"
    both(pair, [sys.executable, "-c", dump])
    same_views(pair, volatile=["data.db"])
    pair.run(("remount",))
    both(pair, [sys.executable, "-c", dump])


# --- make and a C compiler -----------------------------------------------------------------------

C_PROJECT = {
    "proj/Makefile": File(
        b"CFLAGS = -O2 -Wall -Werror\n"
        b"app: main.o util.o\n\t$(CC) -o $@ $^\n"
        b"%.o: %.c util.h\n\t$(CC) $(CFLAGS) -c -o $@ $<\n"
        b"clean:\n\trm -f app *.o\n",
        times_ns=(10**18, 10**18),
    ),
    "proj/util.h": File(b"int twice(int);\n", times_ns=(10**18, 10**18)),
    "proj/util.c": File(
        b'#include "util.h"\nint twice(int x) { return 2 * x; }\n', times_ns=(10**18, 10**18)
    ),
    "proj/main.c": File(
        b'#include <stdio.h>\n#include "util.h"\n'
        b'int main(void) { printf("%d\\n", twice(21)); return 0; }\n',
        times_ns=(10**18, 10**18),
    ),
}


def test_make_builds_a_c_project(make_pair: Any) -> None:
    pair = make_pair([C_PROJECT])
    both(pair, "make -s && ./app", "proj")
    assert both(pair, "./app", "proj") == "42\n"
    both(pair, "make -q app && echo up-to-date", "proj")
    both(pair, "sleep 0.01; touch util.h; make -s && ./app && make clean -s && ls", "proj")
    both(pair, "make -s && ./app", "proj")
    same_views(pair)
    pair.run(("remount",))
    both(pair, "make -q app && echo up-to-date after remount", "proj")
    same_views(pair)
