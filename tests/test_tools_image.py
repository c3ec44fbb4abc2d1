"""``cowfs image export`` and ``cowfs image import`` (issue 21 item 3): a stack of layers as an OCI
image and back.

The output is checked with a real OCI tool, skopeo (Debian's package; make setup installs it),
not only with cowfs's own reader: ``skopeo inspect`` reads the layout and the archive, ``skopeo
copy`` converts each into the other, and cowfs imports what skopeo wrote. A round trip (export,
import, mount the imported stack) must show the original stack's view and give the same
diff_ids. Bad images (missing blobs, digest mismatches, unsafe members, zstd) are refused in one
line with nothing left behind. No test needs the network: skopeo only reads and writes local
files (``oci:`` and ``docker-archive:``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import Dir, Whiteout, build_layer, call_as, cowfs_mount, merged_view, tree_state
from tools_support import (
    Workspace,
    assert_user_error,
    cowfs,
    make_changes,
    unchanged,
    view_of,
    workspace,
)

from cowfs import cli
from cowfs.tools import image_export, layertar

__all__ = ["workspace"]

NOBODY = 65534


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        pytest.fail("skopeo is missing: make setup installs it (the Makefile's APT_PACKAGES)",
                    pytrace=False)
    return path


def run_skopeo(skopeo: str, tmp: Path, *args: str | Path) -> str:
    """skopeo with a scratch TMPDIR and no signature policy to read (local transports only)."""
    result = subprocess.run([skopeo, "--insecure-policy", *map(str, args)], capture_output=True,
                            text=True, check=False, timeout=120,
                            env={**os.environ, "TMPDIR": str(tmp)})
    assert result.returncode == 0, f"skopeo {args}: {result.stderr}"
    return result.stdout


def layered_stack(ws: Workspace) -> list[Path]:
    """Three layers, topmost first: ``top`` (made through a mount of ``mid:base``: deletes,
    an opaque directory, a rename) over ``mid`` (the standard scenario's upper, frozen: whiteouts,
    a renamed directory's redirect, hard links, xattrs) over the base."""
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        make_changes(ws.mnt)
    top = ws.fresh("top")
    with cowfs_mount([ws.upper, ws.base], top, ws.mnt):
        (ws.mnt / "a.txt").unlink()
        shutil.rmtree(ws.mnt / "renamed")
        (ws.mnt / "renamed").mkdir()
        (ws.mnt / "renamed/only").write_text("top:renamed/only\n")
        # Not newdir: it holds a hard link to mid's new.txt, which a layer renaming it must write
        # as a file of its own (OCI layers cannot link across layers: docs/workspaces.md).
        os.rename(ws.mnt / "dir", ws.mnt / "moved")
        (ws.mnt / "top.txt").write_text("top:top.txt\n")
        os.chmod(ws.mnt / "opq", 0o750)
    return [top, ws.upper, ws.base]


def stack_arg(layers: list[Path]) -> str:
    return ":".join(map(str, layers))


def diff_ids(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]))
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    ids: list[str] = config["rootfs"]["diff_ids"]
    return ids


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs/sha256" / digest.removeprefix("sha256:")).read_bytes()


def import_stack(image: Path, into: Path) -> list[Path]:
    result = cowfs("image", "import", image, "--into", into)
    assert result.status == 0, result
    return [Path(p) for p in result.out.strip().split(":")]


def tar_bytes(entries: list[tuple[str, bytes | None]]) -> bytes:
    """A layer tar: ``(name, data)``, data None for a directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_layout(root: Path, layers: list[bytes], *, media_type: str =
                 "application/vnd.oci.image.layer.v1.tar",
                 edit: Callable[[dict[str, Any], dict[str, Any]], None] | None = None) -> Path:
    """A hand-made OCI layout of ``layers`` (bottom first, stored as given); ``edit(manifest,
    config)`` may change the documents before they are stored."""
    blobs = root / "blobs/sha256"
    blobs.mkdir(parents=True)

    def store(data: bytes) -> dict[str, Any]:
        (blobs / sha(data).removeprefix("sha256:")).write_bytes(data)
        return {"digest": sha(data), "size": len(data)}

    config: dict[str, Any] = {"architecture": "amd64", "os": "linux", "rootfs": {
        "type": "layers", "diff_ids": [sha(_uncompressed(layer)) for layer in layers]}}
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType":
                                "application/vnd.oci.image.manifest.v1+json",
                                "layers": [{"mediaType": media_type, **store(layer)}
                                           for layer in layers]}
    if edit is not None:
        edit(manifest, config)
    manifest["config"] = {"mediaType": "application/vnd.oci.image.config.v1+json",
                          **store(json.dumps(config).encode())}
    entry = {"mediaType": "application/vnd.oci.image.manifest.v1+json",
             **store(json.dumps(manifest).encode())}
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def _uncompressed(layer: bytes) -> bytes:
    return gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer


# --- round trips ---------------------------------------------------------------------------------


def test_a_stack_exported_and_imported_shows_the_same_view(workspace: Workspace,
                                                           skopeo: str) -> None:
    ws = workspace
    stack = layered_stack(ws)
    before = view_of(stack, ws.fresh("u1"), ws.mnt)
    layout = ws.root / "image.oci"
    with unchanged(ws.base, "the base"), unchanged(stack[0], "the top layer"), \
            unchanged(stack[1], "the middle layer"):
        result = cowfs("image", "export", stack_arg(stack), "--to", layout)
    assert result.status == 0, result
    assert "exported 3 layers" in result.err
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    inspected = json.loads(run_skopeo(skopeo, ws.root, "inspect", f"oci:{layout}"))
    manifest = json.loads(_blob(layout, json.loads((layout / "index.json").read_text())
                                ["manifests"][0]["digest"]))
    assert inspected["Layers"] == [d["digest"] for d in manifest["layers"]]
    assert all(d["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
               for d in manifest["layers"])
    assert inspected["Os"] == "linux"

    imported = import_stack(layout, ws.root / "layers")
    assert len(imported) == 3
    assert [p.name for p in imported] == [d.removeprefix("sha256:")
                                          for d in diff_ids(layout)[::-1]]
    assert view_of(imported, ws.fresh("u2"), ws.mnt) == before
    again = ws.root / "again.oci"
    assert cowfs("image", "export", stack_arg(imported), "--to", again).status == 0
    assert diff_ids(again) == diff_ids(layout)


def test_the_same_stack_gives_the_same_bytes(workspace: Workspace) -> None:
    ws = workspace
    stack = layered_stack(ws)
    first, second = ws.root / "one.oci", ws.root / "two.oci"
    for out in (first, second):
        assert cowfs("image", "export", stack_arg(stack), "--to", out).status == 0
    assert tree_state(first, times=False) == tree_state(second, times=False)
    for out in (ws.root / "one.tar", ws.root / "two.tar"):
        assert cowfs("image", "export", stack_arg(stack), "--to", out).status == 0
    assert (ws.root / "one.tar").read_bytes() == (ws.root / "two.tar").read_bytes()


def test_skopeo_converts_the_layout_and_cowfs_imports_the_result(workspace: Workspace,
                                                                 skopeo: str) -> None:
    """oci: → docker-archive: (skopeo's own archive: HEX.tar layers, HEX.json config), and
    cowfs's docker-archive → oci: (skopeo's layout); both import to the original view."""
    ws = workspace
    stack = layered_stack(ws)
    before = view_of(stack, ws.fresh("u1"), ws.mnt)
    layout, archive = ws.root / "image.oci", ws.root / "image.tar"
    assert cowfs("image", "export", stack_arg(stack), "--to", layout).status == 0
    result = cowfs("image", "export", stack_arg(stack), "--to", archive, "--tag", "app:1")
    assert result.status == 0, result
    assert "(docker-archive)" in result.err
    inspected = json.loads(run_skopeo(skopeo, ws.root, "inspect",
                                      f"docker-archive:{archive}:app:1"))  # found by its tag
    assert inspected["Layers"] == diff_ids(layout)  # the archive's layers are uncompressed

    converted = ws.root / "skopeo.tar"
    run_skopeo(skopeo, ws.root, "copy", f"oci:{layout}", f"docker-archive:{converted}")
    from_skopeo_archive = import_stack(converted, ws.root / "layers")
    assert view_of(from_skopeo_archive, ws.fresh("u2"), ws.mnt) == before

    back = ws.root / "skopeo.oci"
    run_skopeo(skopeo, ws.root, "copy", f"docker-archive:{archive}", f"oci:{back}")
    from_skopeo_layout = import_stack(back, ws.root / "layers2")
    assert view_of(from_skopeo_layout, ws.fresh("u3"), ws.mnt) == before
    assert diff_ids(back) == diff_ids(layout)


def test_an_upper_exports_on_top_of_its_stack(workspace: Workspace, skopeo: str) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        make_changes(ws.mnt)
        before = merged_view(ws.mnt)
    archive = ws.root / "ws.tar"
    result = cowfs("image", "export", "--upper", ws.upper, "--to", archive)  # recorded lowers
    assert result.status == 0, result
    assert "exported 2 layers" in result.err
    run_skopeo(skopeo, ws.root, "inspect", f"docker-archive:{archive}")
    imported = import_stack(archive, ws.root / "layers")
    assert view_of(imported, ws.fresh("u2"), ws.mnt) == before


def test_a_second_image_reuses_the_layers_it_shares(workspace: Workspace) -> None:
    ws = workspace
    app = build_layer(ws.root / "app", {"app/run": "app"}, "app")
    tool = build_layer(ws.root / "tool", {"tool/run": "tool"}, "tool")
    for name, top in (("app.oci", app), ("tool.oci", tool)):
        assert cowfs("image", "export", f"{top}:{ws.base}", "--to", ws.root / name).status == 0
    layers = ws.root / "layers"
    first = import_stack(ws.root / "app.oci", layers)
    base_state = tree_state(first[1])
    result = cowfs("image", "import", ws.root / "tool.oci", "--into", layers)
    assert result.status == 0, result
    assert "(1 already there)" in result.err
    second = [Path(p) for p in result.out.strip().split(":")]
    assert second[1] == first[1]
    assert tree_state(first[1]) == base_state
    assert sorted(os.listdir(layers)) == sorted({p.name for p in first + second})


@pytest.mark.parametrize(("compression", "link"),
                         [("", tarfile.SYMTYPE), ("gzip", tarfile.SYMTYPE), ("", tarfile.LNKTYPE)],
                         ids=["symlink", "gzip", "hardlink"])
def test_legacy_docker_save_with_a_shared_layer_link(workspace: Workspace, compression: str,
                                                     link: bytes) -> None:
    """Docker before 25: ``ID/layer.tar``, a layer two images share as a symlink to another
    ID's (or a hard link), the config as ``HEX.json``; layers plain or gzip (no media type: the
    first bytes tell)."""
    ws = workspace
    bottom = tar_bytes([("etc", None), ("etc/motd", b"l1\n")])
    top = tar_bytes([("etc", None), ("etc/.wh.motd", b""), ("etc/issue", b"l2\n")])
    config = json.dumps({"rootfs": {"type": "layers",
                                    "diff_ids": [sha(bottom), sha(top)]}}).encode()
    if compression:
        bottom, top = gzip.compress(bottom), gzip.compress(top)
    config_name = sha(config).removeprefix("sha256:") + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": ["x:1"],
                            "Layers": ["aa/layer.tar", "bb/layer.tar"]}]).encode()
    archive = ws.root / "legacy.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in (("aa/layer.tar", bottom), ("cc/layer.tar", top),
                           (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        shared = tarfile.TarInfo("bb/layer.tar")
        shared.type = link
        shared.linkname = "../cc/layer.tar" if link == tarfile.SYMTYPE else "cc/layer.tar"
        tar.addfile(shared)
    stack = import_stack(archive, ws.root / "layers")
    with cowfs_mount(stack, ws.upper, ws.mnt):
        assert sorted(os.listdir(ws.mnt / "etc")) == ["issue"]
        assert (ws.mnt / "etc/issue").read_text() == "l2\n"


def _multi_platform(root: Path, platforms: list[tuple[str, str]]) -> Path:
    """A layout whose index.json names an image index (as ``skopeo copy --all`` writes) of one
    image per platform: a file ``arch`` saying which."""
    entries = []
    for os_name, arch in platforms:
        one = write_layout(root / arch, [tar_bytes([("arch", arch.encode())])])
        for blob in (one / "blobs/sha256").iterdir():
            (root / "blobs/sha256").mkdir(parents=True, exist_ok=True)
            shutil.copy(blob, root / "blobs/sha256" / blob.name)
        entry = json.loads((one / "index.json").read_text())["manifests"][0]
        entries.append({**entry, "platform": {"os": os_name, "architecture": arch}})
        shutil.rmtree(one)
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": entries}).encode()
    (root / "blobs/sha256" / sha(index).removeprefix("sha256:")).write_bytes(index)
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.index.v1+json", "digest": sha(index),
        "size": len(index)}]}))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def test_a_multi_platform_index_gives_this_machines_image(tmp_path: Path) -> None:
    from cowfs.tools.image import host_platform

    os_name, arch = host_platform()
    other = "s390x" if arch != "s390x" else "arm64"
    layout = _multi_platform(tmp_path / "multi", [("linux", other), (os_name, arch)])
    stack = import_stack(layout, tmp_path / "layers")
    assert (stack[0] / "arch").read_text() == arch
    same = _multi_platform(tmp_path / "same", [(os_name, arch), (os_name, arch)])
    assert_user_error(cowfs("image", "import", same, "--into", tmp_path / "l2"),
                      "names 2 images", f"2 of them for {os_name}/{arch}")


# --- bad images ----------------------------------------------------------------------------------


def _layer_ok() -> bytes:
    return tar_bytes([("f", b"x\n")])


def _corrupt_blob(layout: Path) -> None:
    manifest = json.loads(_blob(layout, json.loads((layout / "index.json").read_text())
                                ["manifests"][0]["digest"]))
    path = layout / "blobs/sha256" / manifest["layers"][0]["digest"].removeprefix("sha256:")
    data = bytearray(path.read_bytes())
    data[600] ^= 1
    path.write_bytes(bytes(data))


def _remove_layer_blob(layout: Path) -> None:
    manifest = json.loads(_blob(layout, json.loads((layout / "index.json").read_text())
                                ["manifests"][0]["digest"]))
    (layout / "blobs/sha256" / manifest["layers"][1]["digest"].removeprefix("sha256:")).unlink()


def _wrong_diff_id(manifest: dict[str, Any], config: dict[str, Any]) -> None:
    config["rootfs"]["diff_ids"][1] = sha(b"something else")


BAD_IMAGES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("missing-blob", lambda d: (write_layout(d, [_layer_ok(), tar_bytes([("g", b"y")])]),
                                _remove_layer_blob(d))[0], "missing"),
    ("digest-mismatch", lambda d: (write_layout(d, [_layer_ok()]), _corrupt_blob(d))[0],
     "digest mismatch"),
    ("diff-id-mismatch", lambda d: write_layout(d, [_layer_ok(), tar_bytes([("g", b"y")])],
                                                edit=_wrong_diff_id), "diff_id"),
    ("unsafe-member", lambda d: write_layout(d, [_layer_ok(), tar_bytes([("../escape", b"x")])]),
     "unsafe member"),
    ("not-gzip", lambda d: write_layout(d, [_layer_ok()], media_type=
                                        "application/vnd.oci.image.layer.v1.tar+gzip"),
     "not gzip-compressed"),
    ("gzip-not-declared", lambda d: write_layout(d, [gzip.compress(_layer_ok())]),
     "gzip-compressed, but its media type says an uncompressed tar"),
    ("zstd", lambda d: write_layout(d, [_layer_ok()], media_type=
                                    "application/vnd.oci.image.layer.v1.tar+zstd"), "zstd"),
    ("unknown-media-type", lambda d: write_layout(d, [_layer_ok()], media_type="text/plain"),
     "unsupported media type"),
    ("not-an-image", lambda d: (d.mkdir(), (d / "x").write_text("x"), d)[2], "not an OCI image"),
    ("bad-digest-name", lambda d: write_layout(d, [_layer_ok()], edit=lambda m, c: m["layers"][0]
                                               .update(digest="sha256:../../etc/passwd")),
     "not a sha256 digest"),
]


@pytest.mark.parametrize(("make", "message"), [c[1:] for c in BAD_IMAGES],
                         ids=[c[0] for c in BAD_IMAGES])
def test_a_bad_image_is_refused_and_leaves_nothing(tmp_path: Path, make: Callable[[Path], Path],
                                                   message: str) -> None:
    image = make(tmp_path / "image")
    before = tree_state(tmp_path, times=False)  # the directory's times change (new/ came, went)
    result = cowfs("image", "import", image, "--into", tmp_path / "new/layers")
    assert_user_error(result, message)
    assert not (tmp_path / "new").exists()
    assert tree_state(tmp_path, times=False) == before
    # Into a store that exists: the layers imported before the bad one are removed again.
    store = tmp_path / "store"
    store.mkdir()
    (store / "kept").mkdir()
    assert_user_error(cowfs("image", "import", image, "--into", store), message)
    assert os.listdir(store) == ["kept"]


def test_a_truncated_archive_is_refused_and_leaves_nothing(workspace: Workspace) -> None:
    ws = workspace
    archive = ws.root / "image.tar"
    assert cowfs("image", "export", str(ws.base), "--to", archive).status == 0
    data = archive.read_bytes()
    for cut in (len(data) // 2, 700):
        archive.write_bytes(data[:cut])
        assert_user_error(cowfs("image", "import", archive, "--into", ws.root / "layers"))
        assert not (ws.root / "layers").exists()


def test_export_refuses_bad_stacks_and_leaves_nothing(workspace: Workspace) -> None:
    ws = workspace
    (ws.root / "full").mkdir()
    (ws.root / "full/keep").write_text("x")
    before = tree_state(ws.root)
    assert_user_error(cowfs("image", "export", f"{ws.root}/missing:{ws.base}", "--to",
                            ws.root / "out/image"), "does not exist")
    assert_user_error(cowfs("image", "export", str(ws.base), "--to", ws.root / "full"),
                      "not an empty directory")
    assert_user_error(cowfs("image", "export", "--to", ws.root / "x.oci"), "give the stack")
    assert_user_error(cowfs("image", "export", f"{ws.base}::{ws.base}", "--to",
                            ws.root / "x.oci"), "empty element")
    assert tree_state(ws.root) == before


@pytest.mark.parametrize("signal_name", ["INT", "TERM"])
def test_an_interrupted_image_export_or_import_leaves_nothing(tmp_path: Path,
                                                              signal_name: str) -> None:
    """Interrupted in the second layer (the seams count one layer's records or members): the
    first layer's work is undone too, and the line says what was interrupted."""
    bottom = build_layer(tmp_path / "bottom", {"a": None}, "bottom")
    top = build_layer(tmp_path / "top", {name: None for name in "bcde"}, "top")
    out = tmp_path / "out"
    out.mkdir()
    stack = f"{top}:{bottom}"
    signum = getattr(signal, "SIG" + signal_name)
    for to in ("img.tar", "img.oci"):
        result = cowfs("image", "export", stack, "--to", out / to,
                       env={"COWFS_TEST_EXPORT_FAULT": f"3:{signal_name}"})
        assert_user_error(result, f"image export interrupted (SIG{signal_name})",
                          "was not written")
        assert result.status == 128 + signum
        assert os.listdir(out) == []
    assert cowfs("image", "export", stack, "--to", out / "img.tar").status == 0
    store = tmp_path / "new/store"
    result = cowfs("image", "import", out / "img.tar", "--into", store,
                   env={"COWFS_TEST_IMPORT_FAULT": f"4:{signal_name}"})
    assert_user_error(result, f"image import interrupted (SIG{signal_name})")
    assert result.status == 128 + signum
    assert not (tmp_path / "new").exists()


def test_a_killed_image_import_leaves_what_the_next_one_removes(tmp_path: Path) -> None:
    bottom = build_layer(tmp_path / "bottom", {"a": None}, "bottom")
    top = build_layer(tmp_path / "top", {name: None for name in "bcde"}, "top")
    image = tmp_path / "img.tar"
    assert cowfs("image", "export", f"{top}:{bottom}", "--to", image).status == 0
    killed = cowfs("image", "export", f"{top}:{bottom}", "--to", tmp_path / "again.tar",
                   env={"COWFS_TEST_EXPORT_FAULT": "3:KILL"})
    assert killed.status != 0
    assert any(".cowfs-image-export-" in name for name in os.listdir(tmp_path))
    assert cowfs("image", "export", f"{top}:{bottom}", "--to", tmp_path / "again.tar").status == 0
    assert not any(".cowfs-" in name for name in os.listdir(tmp_path))
    store = tmp_path / "store"
    killed = cowfs("image", "import", image, "--into", store,
                   env={"COWFS_TEST_IMPORT_FAULT": "4:KILL"})
    assert killed.status != 0
    assert any(".cowfs-" in name for name in os.listdir(store))
    other = tmp_path / "other.oci"  # another image: its import removes the leftovers too
    assert cowfs("image", "export", str(bottom), "--to", other).status == 0
    assert cowfs("image", "import", other, "--into", store).status == 0
    assert not any(".cowfs-" in name for name in os.listdir(store))
    result = cowfs("image", "import", image, "--into", store)
    assert result.status == 0, result
    assert sorted(os.listdir(store)) == sorted(p.rpartition("/")[2]
                                               for p in result.out.strip().split(":"))


# --- a plain user --------------------------------------------------------------------------------


def test_a_plain_user_exports_and_imports_an_image_with_whiteouts(
        workspace: Workspace, request: pytest.FixtureRequest) -> None:
    """As uid 65534: a layer with whiteouts (0/0 devices, which a plain user may make) and an
    opaque directory goes out and comes back; the imported stack mounts to the same view."""
    ws = workspace
    home = Path(tempfile.mkdtemp(prefix="cowfs-image-"))
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    home.chmod(0o755)
    base = build_layer(home / "base", {"a": "a", "d/x": "x", "d/y": "y", "o/z": "z"}, "base")
    top = build_layer(home / "top", {"a": Whiteout(), "d/x": Whiteout(), "o/new": "new",
                                     "o/": Dir(xattrs={"user.overlay.opaque": "y"})}, "top")
    for path in (home, base, top, *base.rglob("*"), *top.rglob("*")):
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)

    def as_nobody() -> tuple[int, int]:
        stdout = io.StringIO()
        exported = cli.main(["image", "export", f"{top}:{base}", "--to", str(home / "img.oci")])
        with contextlib.redirect_stdout(stdout):
            imported = cli.main(["image", "import", str(home / "img.oci"), "--into",
                                 str(home / "layers")])
        (home / "stack").write_text(stdout.getvalue().strip())
        return exported, imported

    assert call_as(NOBODY, NOBODY, as_nobody) == (0, 0)
    stack = [Path(p) for p in (home / "stack").read_text().split(":")]
    assert all(p.stat().st_uid == NOBODY for p in stack)
    expected = view_of([top, base], ws.fresh("u1"), ws.mnt)
    assert sorted(expected) == [".", "d", "d/y", "o", "o/new"]
    assert view_of(stack, ws.fresh("u2"), ws.mnt) == expected


# --- pure logic ----------------------------------------------------------------------------------


def test_canonical_form_sorts_members_and_moves_hard_link_data_to_the_first_name() -> None:
    """Members in any order come out in the frozen layer's order (parents first, a whiteout
    where its name would be, an opaque marker first in its directory), without a root member;
    of a hard-linked file, the first name in that order carries the data; times lose their
    fractions, names and pax records other than xattrs go."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, link in ((".", tarfile.DIRTYPE, ""), ("./z", tarfile.REGTYPE, ""),
                                 ("./b", tarfile.DIRTYPE, ""), ("./b/.wh.c", tarfile.REGTYPE, ""),
                                 ("./b/a", tarfile.LNKTYPE, "./z"),
                                 ("./b/.wh..wh..opq", tarfile.REGTYPE, ""),
                                 ("./a-b", tarfile.REGTYPE, ""),
                                 ("./a-b", tarfile.LNKTYPE, "./a-b")):  # written twice
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = kind, link, 1000.75
            info.uname = "someone"
            info.pax_headers = {"SCHILY.xattr.user.k": "v", "comment": "drop me"}
            data = b"data" if kind == tarfile.REGTYPE and ".wh." not in name else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    sink = io.BytesIO()
    layertar.write_canonical(buffer, sink)
    sink.seek(0)
    with tarfile.open(fileobj=sink) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["./a-b", "./b", "./b/.wh..wh..opq", "./b/a",
                                             "./b/.wh.c", "./z"]
        link_holder, link = members[3], members[5]
        assert link_holder.isreg()
        assert tar.extractfile(link_holder).read() == b"data"  # type: ignore[union-attr]
        assert link.islnk()
        assert link.linkname == "./b/a"
        assert {members[i].mtime for i in (0, 1, 3, 5)} == {1000}
        assert all(m.uname == "" for m in members)
        assert members[0].pax_headers == {"SCHILY.xattr.user.k": "v"}
        assert members[0].isreg()
        assert tar.extractfile(members[0]).read() == b"data"  # type: ignore[union-attr]
        assert (members[4].mode, members[4].mtime, members[4].pax_headers) == (0o644, 0, {})


def test_output_format_follows_the_name_unless_given() -> None:
    assert image_export.output_format("x.tar", None) == "docker-archive"
    assert image_export.output_format("x.oci", None) == "oci"
    assert image_export.output_format("x.tar", "oci") == "oci"


def test_options_mix_with_the_stack() -> None:
    args = cli.build_parser().parse_args(["image", "export", "--to", "o", "a:b", "--tag", "t"])
    assert (args.stack, args.to, args.tag) == ("a:b", "o", "t")
    args = cli.build_parser().parse_args(["image", "import", "--into", "d", "img.tar"])
    assert (args.image, args.into) == ("img.tar", "d")
