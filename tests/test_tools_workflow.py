"""Issue 21's whole job, as a podman or docker user does it, with cowfs only: import an image
archive, run a build step in a private view over it, freeze the result as a layer, squash,
export the stack as an OCI image that skopeo reads, and mount the frozen stack with the kernel's
overlayfs, which shows the same tree. Each command's own cases are in test_tools_layers.py and
test_tools_image.py; this is the path between them, checked end to end."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import build_layer, kernel_overlay, merged_view
from test_tools_image import run_skopeo
from tools_support import Result, assert_user_error, cowfs, stack_view


@pytest.fixture
def skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        pytest.fail("skopeo is missing: make setup installs it", pytrace=False)
    return path


def ok(*args: str | Path) -> Result:
    result = cowfs(*args)
    assert result.status == 0, result
    return result


def _diff_ids(stack: Path) -> list[str]:
    listed = json.loads(ok("layer", "list", "--json", stack).out)
    return [layer["diff_id"] for layer in listed["layers"]]


def _image_diff_ids(skopeo: str, tmp: Path, archive: Path) -> list[str]:
    inspected = json.loads(run_skopeo(skopeo, tmp, "inspect", f"docker-archive:{archive}"))
    return list(inspected["Layers"])


#: As a plain user, the kernel's overlayfs mounts in a user namespace of the user's own (Linux 5.11
#: and later, with userxattr): mount(2) called directly, since mount(8) refuses options to a user
#: who is not root even where the capability is there. The merged view is read in that namespace
#: and handed back pickled (support's records).
_KERNEL_VIEW = """
import ctypes, os, pickle, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from support import merged_view
from cowfs.core.libc import libc
from cowfs.tools.private import _own_user_namespace  # what cowfs run enters, user mapped to itself
_own_user_namespace()
options = b"ro,userxattr,lowerdir=" + os.fsencode(sys.argv[2])
if libc.mount(b"overlay", os.fsencode(sys.argv[3]), b"overlay", 0, options) != 0:
    raise OSError(ctypes.get_errno(), "mount -t overlay")
sys.stdout.buffer.write(pickle.dumps(dict(merged_view(Path(sys.argv[3])))))
"""


def kernel_view(lowers: list[Path], tmp: Path) -> dict[str, object]:
    """The tree the kernel's overlayfs shows of ``lowers`` (read-only, userxattr): mounted in
    place as root, in a user namespace of the user's own as a plain user (gone with it)."""
    mnt = tmp / "k" / "mnt"
    mnt.mkdir(parents=True)
    if os.geteuid() == 0:
        dirs = [tmp / "k" / n for n in ("upper", "work")]
        for d in dirs:
            d.mkdir()
        with kernel_overlay(lowers, *dirs, mnt, ["userxattr"]) as kernel:
            return dict(merged_view(kernel.mnt))
    result = subprocess.run([sys.executable, "-c", _KERNEL_VIEW, str(Path(__file__).parent),
                             ":".join(map(str, lowers)), str(mnt)],
                            capture_output=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return pickle.loads(result.stdout)  # type: ignore[no-any-return]


def test_import_run_freeze_squash_export_and_the_kernel_mounts_it(tmp_path: Path,
                                                                   skopeo: str) -> None:
    """The whole job; as root and, in the plain-user pass of ``make test``, as a plain user."""
    os.environ["SOURCE_DATE_EPOCH"] = "1700000000"
    try:
        _whole_job(tmp_path, skopeo)
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]


def _whole_job(tmp_path: Path, skopeo: str) -> None:
    scratch = tmp_path / "skopeo-tmp"
    scratch.mkdir()
    # An image from elsewhere: two layers, the top one deleting a file of the bottom one.
    bottom = build_layer(tmp_path / "bottom", {"etc/motd": None, "etc/issue": None,
                                              "usr/bin/tool": None}, "bottom")
    top = build_layer(tmp_path / "top", {"usr/lib/dep.so": None}, "top")
    (tmp_path / "mnt0").mkdir()
    ok("mount", bottom, top, tmp_path / "mnt0")
    try:
        (tmp_path / "mnt0/etc/issue").unlink()
    finally:
        ok("umount", tmp_path / "mnt0")
    image = tmp_path / "base.tar"
    ok("image", "export", f"{top}:{bottom}", "--to", image)

    # 1. Import it, and make a stack over its layers.
    lowers = ok("image", "import", image, "--into", tmp_path / "layers").out.strip()
    stack = tmp_path / "app"
    ok("layer", "init", stack, lowers)
    # 2. A build step in a private view; 3. its changes frozen as a layer; and a second one.
    ok("run", stack, "--", "sh", "-c", "mkdir -p opt/app && echo v1 > opt/app/version")
    ok("layer", "freeze", stack)
    ok("run", stack, "--", "sh", "-c", "echo v2 > opt/app/version; rm etc/motd")
    ok("layer", "freeze", stack)
    before_squash = stack_view(stack, tmp_path / "mnt")
    version = before_squash["opt/app/version"]
    assert version.sha256 == hashlib.sha256(b"v2\n").hexdigest()  # type: ignore[attr-defined]
    assert "etc/motd" not in before_squash
    assert "etc/issue" not in before_squash
    assert "usr/lib/dep.so" in before_squash
    # 4. Squashed: one layer, the same view.
    assert len(_diff_ids(stack)) == 2
    ok("layer", "squash", stack)
    assert len(_diff_ids(stack)) == 1
    assert stack_view(stack, tmp_path / "mnt") == before_squash

    # 5. Exported as an image that skopeo reads: the imported layers, then the stack's own,
    # whose diff_id is the one its stack names it by.
    out = tmp_path / "app.tar"
    ok("image", "export", stack, "--to", out, "--tag", "app:1")
    diff_ids = _image_diff_ids(skopeo, scratch, out)
    assert len(diff_ids) == 3
    assert diff_ids[-1] == _diff_ids(stack)[0]
    # ... and taken back in, it is the same tree.
    again = ok("image", "import", out, "--into", tmp_path / "again").out.strip()
    ok("layer", "init", tmp_path / "again-stack", again)
    assert stack_view(tmp_path / "again-stack", tmp_path / "mnt") == before_squash

    # 6. The kernel's overlayfs mounts the frozen stack and shows the same tree.
    kernel_lowers = [Path(p) for p in ok("layer", "list", "--lowers", stack).out.strip()
                     .split(":")]
    assert kernel_view(kernel_lowers, tmp_path) == before_squash


def test_an_image_of_a_stack_leaves_out_the_live_changes_and_needs_a_layer(
        tmp_path: Path, skopeo: str) -> None:
    """``cowfs image export STACK`` exports the frozen layers and the base, as ``docker save``
    saves what ``docker commit`` made: changes not frozen yet are named and left out; a stack
    with nothing at all to export is refused with what to do."""
    base = build_layer(tmp_path / "base", {"a": None}, "base")
    stack = tmp_path / "app"
    ok("layer", "init", stack, base)
    refused = cowfs("image", "export", tmp_path / "empty-stack", "--to", tmp_path / "x.tar")
    assert refused.status == 1
    ok("layer", "init", tmp_path / "nothing")
    assert_user_error(cowfs("image", "export", tmp_path / "nothing", "--to", tmp_path / "x.tar"),
                      "has no layers yet", "cowfs layer freeze")
    assert not (tmp_path / "x.tar").exists()
    ok("run", stack, "--", "sh", "-c", "echo one > one")
    ok("layer", "freeze", stack)
    ok("run", stack, "--", "sh", "-c", "echo two > two")
    exported = ok("image", "export", stack, "--to", tmp_path / "app.tar")
    assert "are not exported; freeze them first" in exported.err
    diff_ids = _image_diff_ids(skopeo, tmp_path, tmp_path / "app.tar")
    assert diff_ids[-1] == _diff_ids(stack)[0]
    back = ok("image", "import", tmp_path / "app.tar", "--into", tmp_path / "layers").out.strip()
    names = set()
    for layer in back.split(":"):
        names |= {p.name for p in Path(layer).iterdir()}
    assert "one" in names
    assert "two" not in names
