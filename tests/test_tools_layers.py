"""``cowfs layer init|freeze|list|squash|remove`` (issue 21 items 2 and 4): layer stacks.

Pure logic first (the stack record, the canonical layer tar, the merge of adjacent layers), then
the commands through real mounts (``cowfs run STACK``, ``cowfs mount STACK MNT``), then the
kernel's overlayfs mounting a stack of frozen layers and showing cowfs's view of it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import build_layer, kernel_overlay, merged_view, needs_root
from tools_support import Result, assert_user_error, cowfs, stack_view

from cowfs import cli
from cowfs.tools import stack as stacks
from cowfs.tools.layermerge import merge_layers

HEX = "a" * 64
EPOCH = "1000000000"


# --- the stack record ---------------------------------------------------------------------------


def test_the_stack_record_round_trips() -> None:
    record = stacks.StackFile((HEX, "b" * 64), ("/srv/base",))
    assert stacks.StackFile.from_json(record.to_json()) == record
    assert json.loads(record.to_json()) == {"version": 1, "layers": [HEX, "b" * 64],
                                            "base": ["/srv/base"]}


@pytest.mark.parametrize(("value", "message"), [
    (b'{"version": 2, "layers": [], "base": []}', "version"),
    (b'{"version": 1, "layers": ["../x"], "base": []}', "malformed stack file"),
    (b'{"version": 1, "layers": [], "base": ["rel/path"]}', "plain absolute"),
    (b'{"version": 1, "layers": [], "base": ["/a/../b"]}', "plain absolute"),
    (b'{"version": 1, "layers": ["' + HEX.encode() + b'", "' + HEX.encode() + b'"], '
     b'"base": []}', "twice"),
    (b'{"version": 1, "layers": [], "base": [], "extra": 1}', "malformed stack file"),
    (b'{"version": 1, "layers": []}', "malformed stack file"),
    (b"[]", "malformed stack file"),
])
def test_the_stack_record_refuses_what_it_does_not_define(value: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stacks.StackFile.from_json(value)


# --- the canonical layer tar and the merge ------------------------------------------------------


def _layer(root: Path, *, when: int = 1_500_000_000) -> Path:
    """A frozen-layer-shaped directory: a file, a hard link, a symlink, an xattr, a device
    whiteout, an opaque directory; every time set to ``when``."""
    root.mkdir()
    (root / "d").mkdir()
    (root / "d/f").write_text("f\n")
    os.link(root / "d/f", root / "d/g")
    os.symlink("d/f", root / "s")
    os.setxattr(root / "d/f", "user.note", b"n")
    os.mknod(root / "gone", stat.S_IFCHR, 0)
    (root / "o").mkdir()
    os.setxattr(root / "o", "user.overlay.opaque", b"y")
    (root / "o/in").write_text("in\n")
    for path in [*root.rglob("*"), root]:
        os.utime(path, (when, when), follow_symlinks=False)
    return root


def _tar_bytes(layer: Path) -> bytes:
    out = io.BytesIO()
    stacks.write_layer_tar(layer, out)
    return out.getvalue()


def test_the_layer_tar_is_canonical(tmp_path: Path) -> None:
    one = _tar_bytes(_layer(tmp_path / "one"))
    two = _tar_bytes(_layer(tmp_path / "two"))  # other inodes, made later: the same bytes
    assert one == two
    assert stacks.layer_digest(tmp_path / "one") == hashlib.sha256(one).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(one)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert list(members) == ["./d", "./d/f", "./d/g", "./.wh.gone", "./o", "./o/.wh..wh..opq",
                             "./o/in", "./s"]
    assert members["./d/g"].islnk()
    assert members["./d/g"].linkname == "./d/f"
    assert members["./d/f"].pax_headers["SCHILY.xattr.user.note"] == "n"
    assert members["./d/f"].mtime == 1_500_000_000
    assert members["./s"].issym()
    assert members["./s"].linkname == "d/f"
    # Another time is other content: another digest.
    assert _tar_bytes(_layer(tmp_path / "three", when=1_600_000_000)) != one


def test_the_layer_tar_clamps_times_to_source_date_epoch(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    old = _tar_bytes(_layer(tmp_path / "old", when=900_000_000))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "900000000")
    assert _tar_bytes(_layer(tmp_path / "new", when=1_700_000_000)) == old


def test_merging_layers_follows_the_overlay_rule(tmp_path: Path) -> None:
    bottom = build_layer(tmp_path / "bottom", {"keep": None, "gone": None, "dir/a": None,
                                               "replaced/x": None, "f2d": None}, "bottom")
    top = tmp_path / "top"
    top.mkdir()
    os.mknod(top / "gone", stat.S_IFCHR, 0)
    (top / "dir").mkdir()
    (top / "dir/b").write_text("top\n")
    (top / "replaced").mkdir()
    os.setxattr(top / "replaced", "user.overlay.opaque", b"y")
    (top / "replaced/y").write_text("y\n")
    (top / "f2d").mkdir()
    (top / "f2d/in").write_text("in\n")
    os.mknod(top / "hides_below", stat.S_IFCHR, 0)
    merged = tmp_path / "merged"
    merge_layers([top, bottom], merged)
    assert sorted(p.name for p in merged.iterdir()) == ["dir", "f2d", "gone", "hides_below",
                                                        "keep", "replaced"]
    assert stat.S_ISCHR(os.lstat(merged / "gone").st_mode)
    assert sorted(os.listdir(merged / "dir")) == ["a", "b"]
    assert os.listdir(merged / "replaced") == ["y"]
    assert os.getxattr(merged / "replaced", "user.overlay.opaque") == b"y"
    # A directory over a file hides whatever the layers below the squashed ones have there.
    assert os.getxattr(merged / "f2d", "user.overlay.opaque") == b"y"
    assert "user.overlay.opaque" not in os.listxattr(merged / "dir")


# --- the commands -------------------------------------------------------------------------------


STEP1 = ("echo one > etc/motd; rm gone; mkdir -p usr/bin; echo hi > usr/bin/hi; echo t > tmpf; "
         "mv d d2; ln usr/bin/hi usr/bin/hi2; ln -s ../etc/motd usr/motd")
STEP2 = ("echo two >> etc/motd; mv usr u2; echo new > u2/new; rm tmpf; rm -r d2; mkdir d2; "
         "echo z > d2/z; setfattr -n user.note -v yes etc/motd; chmod 600 keep")


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return build_layer(tmp_path / "base", {"etc/motd": None, "gone": None, "d/f": None,
                                           "keep": None}, "base")


def ok(*args: str | Path, **env: str) -> Result:
    result = _cowfs_env(env, *args)
    assert result.status == 0, result
    return result


def _cowfs_env(env: dict[str, str], *args: str | Path) -> Result:
    if not env:
        return cowfs(*args)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return cowfs(*args)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _layers(stack: Path) -> list[str]:
    return [entry["diff_id"] for entry in json.loads(ok("layer", "list", "--json", stack).out)
            ["layers"]]


def test_freeze_list_squash_remove(tmp_path: Path, base: Path) -> None:
    stack = tmp_path / "app"
    ok("layer", "init", stack, base)
    ok("run", stack, "--", "sh", "-c", STEP1)
    assert ok("diff", stack, "usr").out == "A  usr/\nA  usr/bin/\nA  usr/bin/hi\nA  usr/bin/hi2\n" \
        "A  usr/motd\n"
    listed = ok("layer", "list", stack).out
    assert "changes" in listed
    assert str(base) in listed
    frozen = ok("layer", "freeze", stack)
    (first,) = _layers(stack)
    assert first in frozen.err
    assert not any((stack / "upper").iterdir()), "a fresh upper after the freeze"
    layer = stack / "layers" / first.removeprefix("sha256:")
    assert not (layer / ".cowfs-work").exists()
    assert "user.cowfs.format" not in os.listxattr(layer)
    # The diff_id is the sha256 of the layer's tar as cowfs export writes it.
    ok("export", layer, "-o", tmp_path / "first.tar")
    assert "sha256:" + hashlib.sha256((tmp_path / "first.tar").read_bytes()).hexdigest() == first

    ok("run", stack, "--", "sh", "-c", STEP2)
    ok("layer", "freeze", stack)
    _second, again = _layers(stack)
    assert again == first
    info = json.loads(ok("layer", "list", "--json", stack).out)
    assert info["upper"] == {"path": str((stack / "upper").resolve()), "changes": 0,
                             "mounted": False}
    # etc/motd, keep, u2/new, u2/motd and u2/bin/hi and hi2 (the moved usr), d2/z
    assert info["layers"][0]["files"] == 7
    assert info["lowers"] == ok("layer", "list", "--lowers", stack).out.strip()
    view = stack_view(stack, tmp_path / "mnt")
    assert view["u2/new"].sha256 == hashlib.sha256(b"new\n").hexdigest()  # type: ignore[attr-defined]
    assert "gone" not in view
    assert "d" not in view
    assert "tmpf" not in view

    ok("layer", "squash", stack)
    (squashed,) = _layers(stack)
    assert stack_view(stack, tmp_path / "mnt") == view
    assert not (stack / "layers" / first.removeprefix("sha256:")).exists()

    ok("layer", "remove", stack, squashed.removeprefix("sha256:")[:8])
    assert _layers(stack) == []
    assert os.listdir(stack / "layers") == []
    assert stack_view(stack, tmp_path / "mnt") == _view_of_base(base, tmp_path)


def _view_of_base(base: Path, tmp_path: Path) -> dict[str, object]:
    other = tmp_path / "plain"
    ok("layer", "init", other, base)
    return stack_view(other, tmp_path / "mnt2")


def test_squash_gives_the_diff_id_one_freeze_of_the_same_changes_gives(
        tmp_path: Path, base: Path) -> None:
    """Times clamped (SOURCE_DATE_EPOCH), two freezes squashed and one freeze of both steps
    make the same layer: the same bytes, the same name."""
    two, one = tmp_path / "two", tmp_path / "one"
    ok("layer", "init", two, base)
    ok("layer", "init", one, base)
    ok("run", two, "--", "sh", "-c", STEP1)
    ok("layer", "freeze", two, SOURCE_DATE_EPOCH=EPOCH)
    ok("run", two, "--", "sh", "-c", STEP2)
    ok("layer", "freeze", two, SOURCE_DATE_EPOCH=EPOCH)
    ok("layer", "squash", two, SOURCE_DATE_EPOCH=EPOCH)
    ok("run", one, "--", "sh", "-c", f"{STEP1}; {STEP2}")
    ok("layer", "freeze", one, SOURCE_DATE_EPOCH=EPOCH)
    assert _layers(two) == _layers(one)


def test_run_discard_on_a_stack_leaves_its_upper_alone(tmp_path: Path, base: Path) -> None:
    stack = tmp_path / "app"
    ok("layer", "init", stack, base)
    ok("run", stack, "--", "sh", "-c", "echo kept > kept")
    before = sorted(os.listdir(stack / "upper"))
    done = ok("run", "--discard", stack, "--", "sh", "-c", "cat kept; echo gone > gone")
    assert done.out == "kept\n"
    assert "discarded" in done.err
    assert sorted(os.listdir(stack / "upper")) == before
    assert json.loads(ok("layer", "list", "--json", stack).out)["upper"]["changes"] == 1


def test_export_of_an_upper_is_deterministic(tmp_path: Path, base: Path) -> None:
    stack = tmp_path / "app"
    ok("layer", "init", stack, base)
    ok("run", stack, "--", "sh", "-c", STEP1)
    lowers = ok("layer", "list", "--lowers", stack).out.strip()
    ok("export", "--lower", lowers, stack / "upper", "-o", tmp_path / "a.tar")
    ok("export", "--lower", lowers, stack / "upper", "-o", tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert all(isinstance(m.mtime, int) and "mtime" not in m.pax_headers
                   for m in tar.getmembers())


def test_squash_of_chosen_adjacent_layers(tmp_path: Path, base: Path) -> None:
    stack = tmp_path / "app"
    ok("layer", "init", stack, base)
    for step in ("echo 1 > one", "echo 2 > two", "rm one; echo 3 > three"):
        ok("run", stack, "--", "sh", "-c", step)
        ok("layer", "freeze", stack)
    top, middle, bottom = _layers(stack)
    view = stack_view(stack, tmp_path / "mnt")
    assert_user_error(cowfs("layer", "squash", stack, top[7:19], bottom[7:19]), "adjacent")
    ok("layer", "squash", stack, top, middle[7:19])
    new, kept = _layers(stack)
    assert kept == bottom
    assert new not in (top, middle)
    assert stack_view(stack, tmp_path / "mnt") == view


def test_bad_input_is_one_line(tmp_path: Path, base: Path) -> None:
    stack = tmp_path / "app"
    assert_user_error(cowfs("layer", "freeze", tmp_path), "not a cowfs stack")
    assert_user_error(cowfs("layer", "list", tmp_path / "missing"), "does not exist")
    assert_user_error(cowfs("layer", "init", stack, tmp_path / "nobase"), "does not exist")
    assert not stack.exists()
    assert_user_error(cowfs("layer", "init", base / "inside", base), "inside its base")
    ok("layer", "init", stack, base)
    assert_user_error(cowfs("layer", "init", stack, base), "not an empty directory")
    assert_user_error(cowfs("layer", "init", tmp_path / "on-a-stack", stack), "is a stack")
    assert_user_error(cowfs("layer", "freeze", stack), "no changes")
    assert_user_error(cowfs("layer", "squash", stack), "nothing to squash")
    assert_user_error(cowfs("layer", "remove", stack, "abcd"), "no layer 'abcd'")
    for step in ("echo 1 > one", "echo 2 > two"):
        ok("run", stack, "--", "sh", "-c", step)
        ok("layer", "freeze", stack)
    top, bottom = _layers(stack)
    assert_user_error(cowfs("layer", "remove", stack, bottom), "only the topmost")
    assert_user_error(cowfs("layer", "remove", stack, ""), "no layer")
    ok("run", stack, "--", "sh", "-c", "echo 3 > three")
    assert_user_error(cowfs("layer", "squash", stack), "holds changes")
    assert_user_error(cowfs("layer", "remove", stack, top), "holds changes")
    assert_user_error(cowfs("run", "--upper", tmp_path / "u", stack, "--", "true"),
                      "its own upper")
    assert_user_error(cowfs("mount", base, tmp_path / "mnt"), "not a cowfs stack")
    assert _layers(stack) == [top, bottom]
    (stack / "stack.json").write_text('{"version": 1, "layers": [], "base": ["x"]}')
    assert_user_error(cowfs("layer", "list", stack), "plain absolute path")
    (stack / "stack.json").write_text('{"version": 1, "layers": ["' + HEX + '"], "base": []}')
    assert_user_error(cowfs("layer", "freeze", stack), "missing")
    assert cowfs("layer").status == 2  # argparse's usage error: no traceback
    assert "Traceback" not in cowfs("layer").err


@pytest.mark.parametrize("signal_name", ["INT", "TERM", "KILL"])
def test_an_interrupted_freeze_leaves_the_stack_as_it_was(tmp_path: Path, base: Path,
                                                          signal_name: str) -> None:
    stack = tmp_path / "app"
    ok("layer", "init", stack, base)
    ok("run", stack, "--", "sh", "-c", STEP1)
    before = sorted(os.listdir(stack)), (stack / "stack.json").read_bytes()
    result = _cowfs_env({"COWFS_TEST_EXPORT_FAULT": f"2:{signal_name}"},
                        "layer", "freeze", stack)
    assert result.status != 0
    assert "Traceback" not in result.err
    if signal_name != "KILL":
        assert_user_error(result, "freeze interrupted", "as it was")
        assert (sorted(os.listdir(stack)), (stack / "stack.json").read_bytes()) == before
    assert _layers(stack) == []
    assert json.loads(ok("layer", "list", "--json", stack).out)["upper"]["changes"] > 0
    ok("layer", "freeze", stack)  # and a killed one's scratch directory is removed
    assert sorted(os.listdir(stack)) == ["empty", "layers", "stack.json", "upper"]
    assert len(_layers(stack)) == 1


def test_a_mounted_upper_is_not_frozen(tmp_path: Path, base: Path) -> None:
    stack = tmp_path / "app"
    ok("layer", "init", stack, base)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok("mount", stack, mnt)
    try:
        (mnt / "new").write_text("new\n")
        assert_user_error(cowfs("layer", "freeze", stack), "mount")
        assert json.loads(ok("layer", "list", "--json", stack).out)["upper"]["mounted"]
    finally:
        ok("umount", mnt)
    ok("layer", "freeze", stack)


def test_push_layer_adds_an_oci_layer_tar_on_top(tmp_path: Path, base: Path) -> None:
    """The function an image importer calls, bottom layer first: a tar of another stack's
    layer gives that layer again, by the same name."""
    source = tmp_path / "source"
    ok("layer", "init", source, base)
    ok("run", source, "--", "sh", "-c", STEP1)
    ok("layer", "freeze", source)
    (diff_id,) = _layers(source)
    ok("export", source / "layers" / diff_id[7:], "-o", tmp_path / "layer.tar")
    target = tmp_path / "target"
    ok("layer", "init", target, base)
    added = stacks.push_layer(target, str(tmp_path / "layer.tar"), out=io.StringIO())
    assert added.diff_id == diff_id
    assert [(layer.path, layer.diff_id) for layer in stacks.stack_layers(target)] == [
        ((target / "layers" / diff_id[7:]).resolve(), diff_id)]
    assert stack_view(target, tmp_path / "mnt") == stack_view(source, tmp_path / "mnt")


NOBODY = 65534


def _drop() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _as_nobody(*args: str | Path) -> int:
    """``cowfs ARGS`` as nobody, in a forked child (the shared virtualenv's ``cowfs`` may not be
    executable by nobody); its exit status."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            _drop()
            status = cli.main([str(a) for a in args])
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def nobody_home() -> Iterator[Path]:
    """A directory of nobody's own that it can reach (tmp_path is root's, mode 0700)."""
    home = Path(tempfile.mkdtemp(prefix="cowfs-layers-"))
    home.chmod(0o755)
    os.chown(home, NOBODY, NOBODY)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_a_plain_user_freezes_squashes_and_removes(nobody_home: Path) -> None:
    needs_root("switching to a plain user")
    stack = nobody_home / "app"
    assert _as_nobody("layer", "init", stack) == 0
    assert _as_nobody("layer", "list", stack) == 0
    # Changes written into the upper directly, as a plain user's mount writes them; a
    # read-only directory with contents and an xattr too (a plain user's import fills it before
    # it takes its mode).
    for script in ("mkdir $U/d && echo 1 > $U/d/one && chmod 444 $U/d/one",
                   "mkdir $U/e && echo 2 > $U/e/two && setfattr -n user.k -v v $U/e "
                   "&& chmod 555 $U/e"):
        subprocess.run(["sh", "-c", script.replace("$U", str(stack / "upper"))], check=True,
                       preexec_fn=_drop, timeout=30)
        assert _as_nobody("layer", "freeze", stack) == 0
    assert _as_nobody("layer", "squash", stack) == 0
    (layer,) = json.loads(ok("layer", "list", "--json", stack).out)["layers"]
    assert (Path(layer["path"]) / "d/one").read_text() == "1\n"
    assert (Path(layer["path"]) / "e/two").read_text() == "2\n"
    assert stat.S_IMODE(os.lstat(Path(layer["path"]) / "d/one").st_mode) == 0o444
    assert os.lstat(Path(layer["path"]) / "d").st_uid == NOBODY
    assert stat.S_IMODE(os.lstat(Path(layer["path"]) / "e").st_mode) == 0o555
    assert os.getxattr(Path(layer["path"]) / "e", "user.k") == b"v"
    assert _as_nobody("layer", "remove", stack, layer["diff_id"]) == 0
    assert os.listdir(stack / "layers") == []


# --- the kernel mounts a stack of frozen layers ------------------------------------------------


@pytest.mark.kernel
def test_the_kernel_shows_cowfs_s_view_of_frozen_layers(tmp_path: Path) -> None:
    """Frozen from an upper that holds a metacopy file, a partial file, a renamed directory
    with lower content, cowfs's origins and its work directory, the layers are complete: the
    kernel's overlayfs (userxattr) mounts them and shows exactly what cowfs shows."""
    needs_root("mount -t overlay")
    base = build_layer(tmp_path / "base", {"meta": None, "dir/a": None, "dir/sub/b": None,
                                           "gone/x": None, "links/one": None}, "base")
    with open(base / "big", "wb") as f:
        f.write(os.urandom(3 << 20))
    os.link(base / "links/one", base / "links/two")
    stack = tmp_path / "app"
    ok("layer", "init", stack, base)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok("mount", "-o", "metacopy,partial_copyup=1M", stack, mnt)
    try:
        os.chmod(mnt / "meta", 0o600)                        # metacopy: no data in the upper
        with open(mnt / "big", "r+b") as f:                  # partial: a block in the upper
            f.seek((1 << 20) + 5)
            f.write(b"changed")
        os.rename(mnt / "dir", mnt / "moved")                # a redirect in the upper
        shutil.rmtree(mnt / "gone")
        (mnt / "gone").mkdir()                               # opaque
        (mnt / "gone/new").write_text("new\n")
        os.setxattr(mnt / "moved/a", "user.note", b"kept")
        os.setxattr(mnt / "moved/a", "user.overlay.mine", b"escaped")
        with open(mnt / "links/one", "a") as f:              # a copied-up lower hard link
            f.write("more\n")
        os.symlink("moved/a", mnt / "sym")
        os.mkfifo(mnt / "fifo")
    finally:
        ok("umount", mnt)
    # What the kernel cannot read in a live upper is there before the freeze.
    upper = stack / "upper"
    assert "user.overlay.metacopy" in os.listxattr(upper / "meta")
    assert "user.cowfs.datamap" in os.listxattr(upper / "big")
    assert "user.overlay.redirect" in os.listxattr(upper / "moved")
    assert "user.cowfs.origin" in os.listxattr(upper / "moved/a")
    assert (upper / ".cowfs-work").is_dir()
    ok("layer", "freeze", stack)
    ok("run", stack, "--", "sh", "-c", "rm moved/sub/b; echo top > moved/top; mv gone g2")
    ok("layer", "freeze", stack)
    cowfs_view = stack_view(stack, mnt)
    assert cowfs_view["moved/a"].xattrs == (  # type: ignore[attr-defined]
        ("user.note", b"kept"), ("user.overlay.mine", b"escaped"))

    lowers = ok("layer", "list", "--lowers", stack).out.strip()
    for layer in lowers.split(":")[:-1]:
        listed = [n for n in os.listxattr(layer)]
        assert not any(n.startswith("user.cowfs.") for n in listed), listed
        assert not Path(layer, ".cowfs-work").exists()
    assert _kernel_view(stack, tmp_path / "k1") == cowfs_view
    # Squashed, the one layer is complete for the kernel too, and shows the same.
    ok("layer", "squash", stack)
    assert stack_view(stack, mnt) == cowfs_view
    assert _kernel_view(stack, tmp_path / "k2") == cowfs_view


def _kernel_view(stack: Path, root: Path) -> dict[str, object]:
    """The stack's frozen layers under the kernel's overlayfs (userxattr), with a fresh upper
    of the live upper's mode."""
    lowers = ok("layer", "list", "--lowers", stack).out.strip()
    kernel_upper, work, kernel_mnt = (root / n for n in ("upper", "work", "mnt"))
    for d in (kernel_upper, work, kernel_mnt):
        d.mkdir(parents=True)
    kernel_upper.chmod(stat.S_IMODE(os.stat(stack / "upper").st_mode))
    with kernel_overlay([Path(p) for p in lowers.split(":")], kernel_upper, work, kernel_mnt,
                        ["userxattr"]) as kernel:
        return dict(merged_view(kernel.mnt))


def _image_diff_ids(layout: Path) -> list[str]:
    def blob(digest: str) -> bytes:
        return (layout / "blobs/sha256" / digest.removeprefix("sha256:")).read_bytes()

    manifest = json.loads(blob(json.loads((layout / "index.json").read_text())
                               ["manifests"][0]["digest"]))
    ids: list[str] = json.loads(blob(manifest["config"]["digest"]))["rootfs"]["diff_ids"]
    return ids


def test_an_upper_exported_live_and_frozen_has_one_diff_id(tmp_path: Path, base: Path) -> None:
    """One writer of the canonical tar: ``cowfs image export --upper`` of a live upper (its
    export rewritten) and of the same upper frozen (its directory written) give the same bytes:
    whiteouts, a renamed and an opaque directory, hard links, a symlink, a fifo, xattrs, a mode
    changed on the root."""
    stack = tmp_path / "app"
    ok("layer", "init", stack, base)
    ok("run", stack, "--", "sh", "-c", f"{STEP1}; {STEP2}; mkfifo u2/fifo; chmod 750 .; "
                            "mv etc/motd u2/motd2; rm -r etc; mkdir etc; echo x > etc/x")
    ok("image", "export", "--upper", stack / "upper", "--to", tmp_path / "live.oci")
    ok("layer", "freeze", stack)
    (frozen,) = _layers(stack)
    ok("image", "export", stack, "--to", tmp_path / "frozen.oci")
    live = _image_diff_ids(tmp_path / "live.oci")
    assert live[-1] == frozen
    assert _image_diff_ids(tmp_path / "frozen.oci") == live
    ok("export", stack / "layers" / frozen.removeprefix("sha256:"), "-o", tmp_path / "f.tar")
    with tarfile.open(tmp_path / "f.tar") as tar:
        names = [m.name for m in tar.getmembers()]
    assert "./u2/fifo" in names
    assert "./.wh.gone" in names
    assert "./etc/.wh..wh..opq" in names  # replaces a directory of the base
    assert "./d2/.wh..wh..opq" not in names  # hides nothing (d2 is new)
    assert "." not in names  # no root member
