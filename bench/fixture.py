"""The lower layer every target is mounted over: built once, deterministically, and cached.

A large file, a source tree of small files in nested directories with a git repository in it, and
a directory with many entries. Nothing is downloaded. (The large tree of the large-tree profile
has a fixture of its own: bench/scale.py.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import FIXED_MTIME, MIB, Params, log, run

# --- the fixture ------------------------------------------------------------------------------

_VOCABULARY = """static int struct return if else for while void char const unsigned size_t buf len
    err goto out free alloc lock unlock list node next prev self def class import from yield
    async await None True False data value result parent child inode dentry"""
WORDS = _VOCABULARY.split()


def _source_text(rng: random.Random, size: int) -> bytes:
    lines, total = [], 0
    while total < size:
        indent = "    " * rng.randrange(4)
        line = indent + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 12))) + ";\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:size]


def _source_paths(n: int, rng: random.Random) -> list[str]:
    """Nested directories three levels deep, a source tree's shape: few top dirs, many leaves."""
    dirs = [""]
    for top in range(8):
        dirs.append(f"pkg{top}")
        for mid in range(6):
            dirs.append(f"pkg{top}/mod{mid}")
            for leaf in range(5):
                dirs.append(f"pkg{top}/mod{mid}/sub{leaf}")
    exts = (".c", ".h", ".py", ".rs", ".md", ".txt")
    paths = []
    for i in range(n):
        d = rng.choice(dirs)
        paths.append(f"{d}/file{i:05d}{rng.choice(exts)}".lstrip("/"))
    return paths


def _build_src(src: Path, n: int) -> list[str]:
    rng = random.Random(1)
    paths = _source_paths(n, rng)
    for rel in paths:
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        size = min(64 << 10, int(rng.lognormvariate(8.2, 1.0)) + 64)  # median ~3.7 KiB
        p.write_bytes(_source_text(rng, size))
    for p in [src, *src.rglob("*")]:
        os.utime(p, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.org",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.org",
           "GIT_AUTHOR_DATE": "2020-01-02T00:00:00Z", "GIT_COMMITTER_DATE": "2020-01-02T00:00:00Z"}
    run(["git", "init", "-q", "-b", "main", str(src)], env=env)
    # Overlays report their own inode numbers; "minimal" compares only mtime seconds and size, so
    # that every target measures the same thing: stat all files, read no content.
    for key, value in (("core.checkStat", "minimal"), ("core.trustctime", "false")):
        run(["git", "-C", str(src), "config", key, value])
    run(["git", "-C", str(src), "add", "-A"], timeout=600, env=env)
    run(["git", "-C", str(src), "commit", "-q", "-m", "fixture"], timeout=600, env=env)
    run(["git", "-C", str(src), "gc", "-q"], timeout=600, env=env)
    return paths


def make_empty_files(directory: Path, names: Iterator[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in names:
            os.close(os.open(name, os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
    finally:
        os.close(dfd)


def _build_big(path: Path, mib: int) -> None:
    rng = random.Random(2)
    block = rng.randbytes(MIB)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(i.to_bytes(8, "little") + block[8:])


@dataclass(frozen=True)
class Fixture:
    root: Path
    lower: Path  # big, src/ (a git repository), bigdir/
    tarball: Path  # src without .git, for tar -x
    native_big: Path  # a private copy of lower/big that the native target may write into
    src_files: list[str]
    first_byte: bytes  # byte 0 of big: what the large copy-up writes, so native stays unchanged


def fixture(base: Path, params: Params) -> Fixture:
    key = params.fixture_key()
    root = base / ("fixture-" + "-".join(f"{v}" for v in key.values()))
    stamp = root / "stamp.json"
    if not (stamp.exists() and json.loads(stamp.read_text()).get("key") == key):
        if root.exists():
            shutil.rmtree(root)
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=base))
        log(f"building the fixture in {root} (once; cached until its sizes change)")
        lower = tmp / "lower"
        lower.mkdir()
        _build_big(lower / "big", params.big_mib)
        shutil.copyfile(lower / "big", tmp / "native-big")
        paths = _build_src(lower / "src", params.src_files)
        entries = (f"entry-{i:06d}" for i in range(params.bigdir_entries))
        make_empty_files(lower / "bigdir", entries)
        run(["tar", "-cf", str(tmp / "src.tar"), "--exclude=.git", "-C", str(lower), "src"],
            timeout=600)
        (tmp / "src-files.json").write_text(json.dumps(paths))
        (tmp / "stamp.json").write_text(json.dumps({"key": key}))
        run(["sync"], timeout=600)
        tmp.rename(root)
    big = root / "lower" / "big"
    with open(big, "rb") as f:
        first = f.read(1)
    return Fixture(root, root / "lower", root / "src.tar", root / "native-big",
                   json.loads((root / "src-files.json").read_text()), first)
