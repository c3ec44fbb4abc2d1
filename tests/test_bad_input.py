"""Every subcommand fed bad input: nonexistent paths, files where directories are expected,
directories where files are, mountpoints, uppers in use, over-long names, conflicting options,
bad ``-o`` options, unknown flags.

Each case must exit non-zero with an error on stderr (``error:``), never a traceback, and change
nothing: the whole scratch tree (names, kinds, content, modes, owners, xattrs) is compared before
and after, and the directories the command had no business writing to also by mtime and ctime.
One live mount serves the cases about mountpoints and uppers in use.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import CowfsMount, cowfs_mount, tree_state
from tools_support import cowfs

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True, slots=True)
class Scratch:
    root: Path
    #: A live mount: ``root/live/{base,upper,mnt}``.
    mount: CowfsMount


def _tar(path: Path, name: str, data: bytes = b"x") -> None:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scratch]:
    root = tmp_path_factory.mktemp("bad-input")
    base = root / "base"
    (base / "d").mkdir(parents=True)
    (base / "a.txt").write_text("base:a.txt")
    (base / "d/x").write_text("base:d/x")
    (root / "file").write_text("a file")
    (root / "plain").mkdir()
    (root / "plain/keep").write_text("not an upper")
    (root / "full").mkdir()
    (root / "full/keep").write_text("not empty")
    (root / "dir.tar").mkdir()
    _tar(root / "long.tar", "a" * 300)
    _tar(root / "abs.tar", "/etc/evil")
    _tar(root / "dotdot.tar", "../evil")
    (root / "corrupt.tar").write_bytes(b"\x1f\x8b\x08not really gzip" * 10)
    (root / "layer.tar.zst").write_bytes(b"")
    # A cowfs upper with one change, unmounted, its stack recorded.
    result = cowfs("run", "--upper", root / "upper", base, "--", "sh", "-c",
                   "echo changed > a.txt")
    assert result.status == 0, result
    live = root / "live"
    for name in ("base", "upper", "mnt"):
        (live / name).mkdir(parents=True)
    (live / "base/f").write_text("live:f")
    with cowfs_mount([live / "base"], live / "upper", live / "mnt", foreground=False) as mount:
        (mount.mnt / "new").write_text("x")
        yield Scratch(root, mount)


#: (id, arguments with {placeholders}); ``{r}`` is the scratch root.
CASES: list[tuple[str, list[str]]] = [
    # the command itself
    ("no-command", []),
    ("unknown-command", ["frobnicate"]),
    ("unknown-flag", ["--bogus"]),
    # mount
    ("mount-missing-lower", ["mount", "{r}/missing", "{r}/plain", "{r}/full"]),
    ("mount-lower-is-file", ["mount", "{r}/file", "{r}/plain", "{r}/full"]),
    ("mount-upper-is-file", ["mount", "{r}/base", "{r}/file", "{r}/full"]),
    ("mount-missing-mountpoint", ["mount", "{r}/base", "{r}/upper", "{r}/missing"]),
    ("mount-mountpoint-is-file", ["mount", "{r}/base", "{r}/upper", "{r}/file"]),
    ("mount-bad-option", ["mount", "-o", "bogus", "{r}/base", "{r}/upper", "{r}/full"]),
    ("mount-bad-timeout", ["mount", "-o", "timeout=x", "{r}/base", "{r}/upper", "{r}/full"]),
    ("mount-upper-in-lower", ["mount", "{r}/base", "{r}/base/d", "{r}/full"]),
    ("mount-already-mounted", ["mount", "{r}/base", "{r}/upper", "{r}/live/mnt"]),
    ("mount-upper-in-use", ["mount", "{r}/base", "{r}/live/upper", "{r}/full"]),
    ("mount-f-already-mounted", ["mount", "-f", "{r}/base", "{r}/upper", "{r}/live/mnt"]),
    ("mount-f-bad-option", ["mount", "-f", "-o", "nope=1", "{r}/base", "{r}/upper", "{r}/full"]),
    ("mount-f-upper-in-use", ["mount", "-f", "{r}/base", "{r}/live/upper", "{r}/full"]),
    ("mount-missing-args", ["mount", "{r}/base"]),
    # umount
    ("umount-not-mounted", ["umount", "{r}/plain"]),
    ("umount-missing", ["umount", "{r}/missing"]),
    ("umount-file", ["umount", "{r}/file"]),
    ("umount-bad-timeout", ["umount", "--timeout", "soon", "{r}/live/mnt"]),
    # run
    ("run-missing-base", ["run", "{r}/missing", "--", "true"]),
    ("run-base-is-file", ["run", "{r}/file", "--", "true"]),
    ("run-no-command", ["run", "{r}/base"]),
    ("run-upper-is-file", ["run", "--upper", "{r}/file", "{r}/base", "--", "true"]),
    ("run-upper-in-base", ["run", "--upper", "{r}/base/new", "{r}/base", "--", "true"]),
    ("run-upper-holds-files", ["run", "--upper", "{r}/plain", "{r}/base", "--", "true"]),
    ("run-discard-used-upper", ["run", "--discard", "--upper", "{r}/upper", "{r}/base", "--",
                                "true"]),
    ("run-at-file", ["run", "--at", "{r}/file", "{r}/base", "--", "true"]),
    ("run-at-mounted", ["run", "--at", "{r}/live/mnt", "{r}/base", "--", "true"]),
    ("run-upper-in-use", ["run", "--upper", "{r}/live/upper", "{r}/base", "--", "true"]),
    ("run-keep-and-discard", ["run", "--keep", "--discard", "{r}/base", "--", "true"]),
    ("run-command-not-found", ["run", "--at", "{r}/view", "{r}/base", "--", "no-such-cmd-x"]),
    # diff
    ("diff-missing", ["diff", "{r}/missing"]),
    ("diff-file", ["diff", "{r}/file"]),
    ("diff-plain-dir", ["diff", "{r}/plain"]),
    ("diff-missing-lower", ["diff", "--lower", "{r}/missing", "{r}/upper"]),
    ("diff-unknown-flag", ["diff", "--bogus", "{r}/upper"]),
    # commit
    ("commit-missing-upper", ["commit", "{r}/missing", "--into", "{r}/base", "--yes"]),
    ("commit-upper-is-file", ["commit", "{r}/file", "--into", "{r}/base", "--yes"]),
    ("commit-no-into", ["commit", "{r}/upper", "--yes"]),
    ("commit-into-missing", ["commit", "{r}/upper", "--into", "{r}/missing", "--yes"]),
    ("commit-into-file", ["commit", "{r}/upper", "--into", "{r}/file", "--yes"]),
    ("commit-plain-upper", ["commit", "{r}/plain", "--into", "{r}/base", "--yes"]),
    ("commit-swapped", ["commit", "{r}/base", "--into", "{r}/upper", "--yes"]),
    ("commit-other-base", ["commit", "{r}/upper", "--into", "{r}/full", "--yes"]),
    ("commit-mountpoint", ["commit", "{r}/live/mnt", "--into", "{r}/live/base", "--yes"]),
    ("commit-mounted-upper", ["commit", "{r}/live/upper", "--into", "{r}/live/base", "--yes"]),
    ("commit-no-terminal-no-yes", ["commit", "{r}/upper", "--into", "{r}/base"]),
    # reset
    ("reset-missing", ["reset", "{r}/missing", "--yes"]),
    ("reset-file", ["reset", "{r}/file", "--yes"]),
    ("reset-plain-dir", ["reset", "{r}/plain", "--yes"]),
    ("reset-dotdot", ["reset", "{r}/upper", "--yes", "../base"]),
    ("reset-mountpoint", ["reset", "{r}/live/mnt", "--yes"]),
    ("reset-mounted-upper", ["reset", "{r}/live/upper", "--yes"]),
    ("reset-no-terminal-no-yes", ["reset", "{r}/upper"]),
    # export
    ("export-output-is-dir", ["export", "{r}/upper", "-o", "{r}/plain"]),
    ("export-under-a-file", ["export", "{r}/upper", "-o", "{r}/file/x.tar"]),
    ("export-missing", ["export", "{r}/missing", "-o", "{r}/out.tar"]),
    ("export-upper-is-file", ["export", "{r}/file", "-o", "{r}/out.tar"]),
    ("export-plain-dir", ["export", "{r}/plain", "-o", "{r}/out.tar"]),
    ("export-zstd", ["export", "{r}/upper", "-o", "{r}/layer.tar.zst"]),
    ("export-no-output", ["export", "{r}/upper"]),
    # import
    ("import-missing-archive", ["import", "{r}/missing.tar", "{r}/new-layer"]),
    ("import-archive-is-dir", ["import", "{r}/dir.tar", "{r}/new-layer"]),
    ("import-into-non-empty", ["import", "{r}/long.tar", "{r}/full"]),
    ("import-into-file", ["import", "{r}/long.tar", "{r}/file"]),
    ("import-under-a-file", ["import", "{r}/long.tar", "{r}/file/layer"]),
    ("import-into-mountpoint", ["import", "{r}/long.tar", "{r}/live/mnt"]),
    ("import-long-name", ["import", "{r}/long.tar", "{r}/new-layer"]),
    ("import-long-name-new-parents", ["import", "{r}/long.tar", "{r}/new/deep/layer"]),
    ("import-absolute-member", ["import", "{r}/abs.tar", "{r}/new-layer"]),
    ("import-dotdot-member", ["import", "{r}/dotdot.tar", "{r}/new-layer"]),
    ("import-corrupt", ["import", "{r}/corrupt.tar", "{r}/new/layer"]),
    ("import-missing-dir-arg", ["import", "{r}/long.tar"]),
    # image
    ("image-no-action", ["image"]),
    ("image-export-missing-layer", ["image", "export", "{r}/missing:{r}/base", "--to",
                                    "{r}/new/image.oci"]),
    ("image-export-layer-is-file", ["image", "export", "{r}/file", "--to", "{r}/image.oci"]),
    ("image-export-into-non-empty", ["image", "export", "{r}/base", "--to", "{r}/full"]),
    ("image-export-under-a-file", ["image", "export", "{r}/base", "--to", "{r}/file/i.tar"]),
    ("image-export-archive-is-dir", ["image", "export", "{r}/base", "--to", "{r}/dir.tar"]),
    ("image-export-no-to", ["image", "export", "{r}/base"]),
    ("image-export-bad-format", ["image", "export", "{r}/base", "--to", "{r}/i", "--format",
                                 "zip"]),
    ("image-import-missing", ["image", "import", "{r}/missing.tar", "--into", "{r}/new"]),
    ("image-import-plain-dir", ["image", "import", "{r}/plain", "--into", "{r}/new"]),
    ("image-import-file", ["image", "import", "{r}/file", "--into", "{r}/new"]),
    ("image-import-layer-tar", ["image", "import", "{r}/long.tar", "--into", "{r}/new"]),
    ("image-import-corrupt", ["image", "import", "{r}/corrupt.tar", "--into", "{r}/new/deep"]),
    ("image-import-into-file", ["image", "import", "{r}/long.tar", "--into", "{r}/file"]),
    ("image-import-no-into", ["image", "import", "{r}/long.tar"]),
    # status
    ("status-unknown-flag", ["status", "--bogus"]),
    ("status-extra-argument", ["status", "{r}/upper"]),
    # check
    ("check-missing", ["check", "{r}/missing"]),
    ("check-file", ["check", "{r}/file"]),
    ("check-missing-lower", ["check", "--lower", "{r}/missing", "{r}/upper"]),
    ("check-repair-mounted", ["check", "--repair", "--yes", "{r}/live/upper"]),
    # layer (stacks)
    ("layer-no-action", ["layer"]),
    ("layer-unknown-action", ["layer", "bogus", "{r}/upper"]),
    ("layer-init-non-empty", ["layer", "init", "{r}/full", "{r}/base"]),
    ("layer-init-missing-base", ["layer", "init", "{r}/new-stack", "{r}/missing"]),
    ("layer-init-base-is-file", ["layer", "init", "{r}/new-stack", "{r}/file"]),
    ("layer-init-inside-base", ["layer", "init", "{r}/base/stack", "{r}/base"]),
    ("layer-freeze-missing", ["layer", "freeze", "{r}/missing"]),
    ("layer-freeze-file", ["layer", "freeze", "{r}/file"]),
    ("layer-freeze-not-a-stack", ["layer", "freeze", "{r}/upper"]),
    ("layer-list-not-a-stack", ["layer", "list", "{r}/plain"]),
    ("layer-squash-not-a-stack", ["layer", "squash", "{r}/base"]),
    ("layer-remove-not-a-stack", ["layer", "remove", "{r}/base", "abcd"]),
    ("layer-remove-no-layer-arg", ["layer", "remove", "{r}/base"]),
    ("mount-stack-not-a-stack", ["mount", "{r}/base", "{r}/mnt"]),
]


def _snapshot(scratch: Scratch) -> tuple[dict[str, object], dict[str, object]]:
    """The whole tree without times, and the layers and inputs with them."""
    root = scratch.root
    everything = tree_state(root, times=False, skip=["live/mnt"])
    with_times: dict[str, object] = {str(p): tree_state(p, times=True) for p in (
        root / "base", root / "upper", root / "plain", root / "full", root / "live/base")}
    st = os.stat(root / "file")
    with_times["file"] = (st.st_mtime_ns, st.st_ctime_ns)
    return everything, with_times


@pytest.mark.parametrize(("case", "argv"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_without_a_trace(scratch: Scratch, case: str,
                                              argv: list[str]) -> None:
    args = [a.format(r=scratch.root) for a in argv]
    before = _snapshot(scratch)
    result = cowfs(*args, timeout=120)
    after = _snapshot(scratch)
    assert result.status != 0, f"cowfs {' '.join(args)} exited 0: {result}"
    assert "Traceback" not in result.out + result.err, result.err
    error_lines = [line for line in result.err.splitlines() if "error:" in line]
    assert error_lines, f"no error line: {result}"
    assert len(result.err.strip().splitlines()) <= 3, f"more than an error: {result.err}"
    assert after == before, f"cowfs {' '.join(args)} changed something it refused to touch"
    live = subprocess.run(["findmnt", "-n", str(scratch.mount.mnt)], capture_output=True,
                          text=True, check=False, timeout=10)
    assert live.returncode == 0, "the live mount is gone"
    assert (scratch.mount.mnt / "new").read_text() == "x"
