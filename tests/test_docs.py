"""Every command of README.md and docs/ runs as written and does what the text says.

Each document's shell blocks (```sh) run in order in one bash session (``set -euo pipefail``,
stderr merged into stdout, as a user sees them), in a scratch directory: ``HOME`` and ``TMPDIR``
point into it, and the absolute paths the docs use as examples (``/tmp/``, ``/srv/``, ``/data/``,
``/mnt/``, ``/layers/``, ``/var/tmp/``) are rewritten to the same paths under it. A ```text block
right after a shell block is the output the text promises: it must match, token by token
(whitespace and ``ls`` columns aside), ``...`` standing for anything and ``XXXXXXXXXX`` for a
``mktemp`` name.

The markdown says what is not run, and why, right before the block:
``<!-- not-run: REASON -->``. Prerequisites a reader would already have (a project, a job to
run) are set up by ``<!-- doc-test setup: COMMANDS -->`` before the block, visible in the
source. Whatever a document mounted is unmounted afterwards, whatever happened.
docker/README.md's commands run in ``make docker-test`` instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import find_cowfs, needs_root

WORKTREE = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", "docs/cli.md", "docs/workspaces.md", "docs/performance.md",
             "docs/layer-format.md", "docs/tutorials/overlay-on-a-directory.md",
             "docs/tutorials/disposable-views.md", "docs/tutorials/layered-workspaces.md"]
#: Example paths the docs use, rewritten to the scratch directory.
REDIRECTED = ("/tmp/", "/srv/", "/data/", "/mnt/", "/layers/", "/var/tmp/")
TIMEOUT = 300
MARKER = "@@doc-test block {}@@"

pytestmark = pytest.mark.timeout(TIMEOUT + 60)


@dataclass(frozen=True, slots=True)
class Block:
    line: int
    code: str
    #: The output the text promises (the ```text block that follows), or None.
    expected: str | None
    #: Why it is not run, or None.
    skip: str | None
    setup: str | None


FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
NOT_RUN = re.compile(r"<!-- not-run: (.+?) -->\s*$")
SETUP = re.compile(r"<!-- doc-test setup: (.+?) -->\s*$", re.S)


def blocks_of(text: str) -> list[Block]:
    found: list[Block] = []
    fences = list(FENCE.finditer(text))
    for i, fence in enumerate(fences):
        if fence.group(1) not in ("sh", "bash"):
            continue
        before = text[:fence.start()].rstrip("\n")
        last_line = before.rsplit("\n", 1)[-1]
        skip = NOT_RUN.search(last_line)
        setup = SETUP.search(last_line)
        expected = None
        if i + 1 < len(fences) and fences[i + 1].group(1) == "text" and \
                not text[fence.end():fences[i + 1].start()].strip():
            expected = fences[i + 1].group(2)
        found.append(Block(text[:fence.start()].count("\n") + 2, fence.group(2), expected,
                           skip.group(1) if skip else None, setup.group(1) if setup else None))
    return found


def redirect(text: str, scratch: Path) -> str:
    for prefix in REDIRECTED:
        text = re.sub(rf"(?<![\w./-]){re.escape(prefix)}", f"{scratch}{prefix}", text)
    return text


def unredirect(text: str, scratch: Path) -> str:
    return text.replace(f"{scratch}/home", "~").replace(str(scratch), "")


def matches(expected: str, actual: str) -> bool:
    """Token by token; ``...`` is anything (a whole token: any number of tokens)."""
    pieces = []
    for token in expected.split():
        if token == "...":
            pieces.append(r"(?:\S+\s+)*?\S*")
            continue
        piece = re.escape(token).replace(r"\.\.\.", r"\S*").replace("XXXXXXXXXX", r"[^/\s]+")
        pieces.append(piece)
    return re.fullmatch(r"\s+".join(pieces), " ".join(actual.split())) is not None


def script_of(blocks: list[Block]) -> str:
    lines = ["exec 2>&1", "set -euo pipefail"]
    for n, block in enumerate(blocks):
        if block.skip is not None:
            continue
        lines.append(f"printf '\\n{MARKER.format(n)}\\n'")
        if block.setup:
            lines.append(block.setup)
        lines.append(block.code)
    lines.append(f"printf '\\n{MARKER.format('end')}\\n'")
    return "\n".join(lines) + "\n"


def unmount_everything_under(scratch: Path) -> None:
    """Topmost first, FUSE and kernel mounts alike; lazily when busy."""
    for _ in range(20):
        mounted = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text()
                   .splitlines() if line.split()[4].startswith(str(scratch))]
        if not mounted:
            return
        target = mounted[-1]
        if subprocess.run(["fusermount3", "-u", target], capture_output=True, check=False,
                          timeout=30).returncode != 0:
            subprocess.run(["umount", target], capture_output=True, check=False, timeout=30)
        if target in Path("/proc/self/mountinfo").read_text():
            subprocess.run(["umount", "-l", target], capture_output=True, check=False,
                           timeout=30)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_command_of_the_docs_runs_as_written(document: str, tmp_path: Path) -> None:
    needs_root("the docs are written for root (mount -t overlay, chown on copy-up)")
    blocks = blocks_of((WORKTREE / document).read_text())
    runnable = [b for b in blocks if b.skip is None]
    if not runnable:
        pytest.skip(f"{document}: every block is marked not-run")
    scratch = tmp_path / "scratch"
    for prefix in ("home", "work", *REDIRECTED):
        (scratch / prefix.strip("/")).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(scratch / "home"), "TMPDIR": str(scratch / "tmp"),
           "PATH": f"{find_cowfs().parent}:{os.environ['PATH']}", "LC_ALL": "C.UTF-8",
           "COLUMNS": "100"}
    script = redirect(script_of(blocks), scratch)
    (tmp_path / "script.sh").write_text(script)
    proc = subprocess.Popen(["bash", str(tmp_path / "script.sh")], cwd=scratch / "work",
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    finally:
        unmount_everything_under(scratch)
    parts = re.split(r"\n@@doc-test block (\w+)@@\n", "\n" + output)
    outputs = dict(zip(parts[1::2], parts[2::2], strict=True))
    for n, block in enumerate(blocks):
        if block.skip is not None:
            continue
        where = f"{document}:{block.line}"
        assert str(n) in outputs, f"{where} never ran: an earlier block failed"
        if "end" not in outputs and str(n) == max(outputs, key=lambda k: int(k)
                                                   if k.isdigit() else -1):
            pytest.fail(f"{where} failed (status {proc.returncode}):\n{block.code}\n"
                        f"--- output:\n{unredirect(outputs[str(n)], scratch)}")
        if block.expected is not None:
            actual = unredirect(outputs[str(n)], scratch)
            assert matches(block.expected, actual), (
                f"{where}: the output is not what the text says\n--- text:\n{block.expected}"
                f"--- actual:\n{actual}")
    assert proc.returncode == 0, f"{document}: status {proc.returncode}\n{output[-3000:]}"
    shutil.rmtree(scratch, ignore_errors=True)


def test_token_matching() -> None:
    assert matches("a  b\nc", "a b c")
    assert matches("drwx 2 root ... .", "drwx 2 root 4096 Nov 29 12:00 .")
    assert matches("/tmp/tmp.XXXXXXXXXX/raw", "/tmp/tmp.abc123/raw")
    assert not matches("a b", "a c")
    assert not matches("v2 raw v1", "v2 v1")


def test_blocks_are_found_with_their_markers() -> None:
    text = ("x\n\n```sh\necho a\n```\n\n```text\na\n```\n\n<!-- not-run: needs docker -->\n"
            "```sh\ndocker ps\n```\n<!-- doc-test setup: mkdir -p p -->\n```sh\nls p\n```\n")
    found = blocks_of(text)
    assert [(b.code, b.expected, b.skip, b.setup) for b in found] == [
        ("echo a\n", "a\n", None, None), ("docker ps\n", None, "needs docker", None),
        ("ls p\n", None, None, "mkdir -p p")]


def _docker_save(img: Path, layout: str) -> None:
    """What ``docker save`` writes, extracted: two layers, bottom first in manifest.json."""
    import hashlib
    import io
    import json
    import tarfile

    layers = []
    for n, (name, data) in enumerate([("etc/motd", b"l1:etc/motd\n"),
                                      ("etc/issue", b"l2:etc/issue\n")]):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        blob = buf.getvalue()
        if layout == "oci":  # Docker 25 and later
            digest = hashlib.sha256(blob).hexdigest()
            path = f"blobs/sha256/{digest}"
        else:  # Docker before 25 (Debian 12's docker.io 20.10)
            path = f"{n:064x}/layer.tar"
        (img / path).parent.mkdir(parents=True, exist_ok=True)
        (img / path).write_bytes(blob)
        layers.append(path)
    (img / "manifest.json").write_text(json.dumps([{"Config": "config.json",
                                                    "RepoTags": ["myimage:latest"],
                                                    "Layers": layers}]))
    if layout == "oci":
        (img / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')
        (img / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


@pytest.mark.parametrize("layout", ["oci", "legacy"])
def test_tutorial_3_imports_either_docker_save_layout(layout: str, tmp_path: Path) -> None:
    """docs/workspaces.md's import loop, as written, on both layouts ``docker save`` writes."""
    text = (WORKTREE / "docs/workspaces.md").read_text()
    block = next(b for b in blocks_of(text) if "manifest.json" in b.code and b.skip is None)
    loop = block.code.split("\nmkdir ", 1)[0]
    scratch = tmp_path / "scratch"
    for prefix in REDIRECTED:
        (scratch / prefix.strip("/")).mkdir(parents=True, exist_ok=True)
    _docker_save(scratch / "tmp/img", layout)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", redirect(loop, scratch)],
                            env={**os.environ, "PATH": f"{find_cowfs().parent}:"
                                 f"{os.environ['PATH']}"}, capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (scratch / "srv/layers/l1/etc/motd").read_text() == "l1:etc/motd\n"
    assert (scratch / "srv/layers/l2/etc/issue").read_text() == "l2:etc/issue\n"
