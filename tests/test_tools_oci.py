"""``cowfs export`` and ``cowfs import``: OCI layer tars out of an upper and back into a cowfs
layer. Round trips (export, import, stack the imported layer on the base: the same view), the tar's
whiteout conventions, a hand-made Docker-style layer, and corrupt or unsafe archives refused with
nothing left behind."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from support import cowfs_mount, find_cowfs, merged_view
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

__all__ = ["workspace"]


@pytest.mark.parametrize("name", ["layer.tar", "layer.tar.gz"])
def test_export_import_round_trip(workspace: Workspace, name: str) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        make_changes(ws.mnt)
        with open(ws.mnt / "hard/one", "a") as f:
            f.write("more\n")
        before = merged_view(ws.mnt)
    archive = ws.root / name
    with unchanged(ws.base, "the base"), unchanged(ws.upper, "the upper"):
        exported = cowfs("export", "--lower", ws.base, ws.upper, "-o", archive)
    assert exported.status == 0, exported
    layer = ws.root / "imported"
    imported = cowfs("import", archive, layer)
    assert imported.status == 0, imported
    empty = ws.fresh("empty-upper")
    with unchanged(ws.base, "the base"), unchanged(layer, "the imported layer"):
        assert view_of([layer, ws.base], empty, ws.mnt) == before


def test_export_writes_oci_whiteouts_opaque_markers_and_hard_links(workspace: Workspace) -> None:
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        make_changes(ws.mnt)
    archive = ws.root / "layer.tar"
    assert cowfs("export", "--lower", ws.base, ws.upper, "-o", archive).status == 0
    with tarfile.open(archive) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
    assert members[".wh.b.txt"].isfile()
    assert members[".wh.old"].size == 0  # the renamed directory's old name
    assert "dir/.wh.sub" in members
    assert "opq/.wh..wh..opq" in members
    # Renames are written whole (OCI has none), opaque only where a directory below would
    # show through: nothing in the base is called "renamed".
    assert "renamed/.wh..wh..opq" not in members
    assert {"renamed/inner/z", "renamed/keep", "renamed/added"} <= set(members)
    hardlink = members["newdir/nested/hardlink"]
    assert hardlink.islnk()
    assert hardlink.linkname.removeprefix("./") == "new.txt"
    assert members["dir/x"].pax_headers["SCHILY.xattr.user.comment"] == "hello"
    assert not any(".cowfs-work" in n or "overlay" in str(m.pax_headers)
                   for n, m in members.items())


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return info


def test_import_of_a_docker_style_layer(workspace: Workspace) -> None:
    """Whiteouts and opaque markers become the cowfs format; the kernel-style view results."""
    ws = workspace
    data = _tar([
        (_entry("dir", tarfile.DIRTYPE), None),
        (_entry("dir/.wh.x"), b""),
        (_entry("opq", tarfile.DIRTYPE), None),
        (_entry("opq/.wh..wh..opq"), b""),
        (_entry("opq/only"), b"only\n"),
        (_entry(".wh.b.txt"), b""),
        (_entry("usr/bin/tool"), b"#!/bin/sh\n"),
        (_entry("usr/bin/alias", tarfile.SYMTYPE, "/usr/bin/tool"), None),
        (_entry("usr/bin/hard", tarfile.LNKTYPE, "usr/bin/tool"), None),
        (_entry(".wh..wh.plnk", tarfile.DIRTYPE), None),
    ])
    archive = ws.root / "docker.tar"
    archive.write_bytes(data)
    layer = ws.root / "layer"
    assert cowfs("import", archive, layer).status == 0
    assert _is_device_whiteout(layer / "dir/x"), "a whiteout as the kernel makes it"
    assert os.getxattr(layer / "opq", "user.overlay.opaque") == b"y"
    with cowfs_mount([layer, ws.base], ws.upper, ws.mnt):
        assert not (ws.mnt / "b.txt").exists()
        assert not (ws.mnt / "dir/x").exists()
        assert (ws.mnt / "dir/sub/deep").exists()
        assert os.listdir(ws.mnt / "opq") == ["only"]
        assert os.readlink(ws.mnt / "usr/bin/alias") == "/usr/bin/tool"
        assert (ws.mnt / "usr/bin/hard").stat().st_nlink == 2
        assert not (ws.mnt / ".wh..wh.plnk").exists()


def _is_device_whiteout(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


NOBODY = 65534


def test_a_plain_user_imports_a_layer_with_whiteouts(workspace: Workspace,
                                                      request: pytest.FixtureRequest) -> None:
    """Issue 21: ``cowfs import`` as a plain user failed on any whiteout ("Permission denied":
    a mode-0 file cannot be given a ``user.*`` xattr by its non-root owner). Whiteouts are now
    0/0 devices, which any user may make, as the mount makes them."""
    ws = workspace
    # A directory of nobody's own that it can reach (the test's tmp_path is root's, mode 0700).
    home = Path(tempfile.mkdtemp(prefix="cowfs-import-"))
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    home.chmod(0o755)
    os.chown(home, NOBODY, NOBODY)
    archive = home / "layer.tar"
    archive.write_bytes(_tar([(_entry("dir", tarfile.DIRTYPE), None),
                              (_entry("dir/.wh.x"), b""),
                              (_entry(".wh.b.txt"), b""),
                              (_entry("new"), b"new\n")]))
    layer = home / "layer"
    pid = os.fork()
    if pid == 0:  # the child, as nobody: never returns
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            status = cli.main(["import", str(archive), str(layer)])
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _is_device_whiteout(layer / "dir/x")
    assert _is_device_whiteout(layer / "b.txt")
    assert os.lstat(layer / "new").st_uid == NOBODY
    with cowfs_mount([layer, ws.base], ws.upper, ws.mnt):
        assert not (ws.mnt / "b.txt").exists()
        assert not (ws.mnt / "dir/x").exists()
        assert (ws.mnt / "dir/sub/deep").exists()
        assert (ws.mnt / "new").read_text() == "new\n"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([(_entry("/etc/passwd"), b"x")], "absolute path"),
        ([(_entry("a/../../escape"), b"x")], "'..'"),
        ([(_entry("h", tarfile.LNKTYPE, "../outside"), None)], "'..'"),
        ([(_entry("h", tarfile.LNKTYPE, "/etc/passwd"), None)], "absolute path"),
        ([(_entry("h", tarfile.LNKTYPE, "nothing"), None)], "hard link"),
        ([(_entry("sl", tarfile.SYMTYPE, "/etc"), None), (_entry("sl/passwd"), b"x")],
         "refusing to write through it"),
        ([(_entry("ok"), b"x"), (_entry(".wh.."), b"")], "whiteout"),
    ],
    ids=["absolute", "dotdot", "link-dotdot", "link-absolute", "link-nothing",
         "through-symlink", "whiteout-dotdot"],
)
def test_import_refuses_unsafe_members(workspace: Workspace, entries: list, message: str) -> None:
    ws = workspace
    archive = ws.root / "evil.tar"
    archive.write_bytes(_tar(entries))
    layer = ws.root / "layer"
    with unchanged(ws.root / "base", "the base"):
        assert_user_error(cowfs("import", archive, layer), "unsafe member", message)
    assert not layer.exists()
    assert sorted(os.listdir(ws.root)) == ["base", "evil.tar", "mnt", "upper"]


def test_import_of_a_corrupt_or_missing_archive(workspace: Workspace) -> None:
    ws = workspace
    good = _tar([(_entry(f"f{i}"), os.urandom(3000)) for i in range(5)])
    corrupt = ws.root / "corrupt.tar"
    corrupt.write_bytes(good[: len(good) // 2])
    layer = ws.root / "layer"
    assert_user_error(cowfs("import", corrupt, layer), "corrupt")
    (ws.root / "junk.tar").write_bytes(b"this is not a tar archive at all" * 40)
    junk = cowfs("import", ws.root / "junk.tar", layer)
    assert_user_error(junk, "corrupt", "invalid header")
    assert "ReadError" not in junk.err, "in words, not tarfile's repr"
    # Cut inside the third member's header: tarfile stops there quietly, as at an end; the
    # import must not take the first two members for the whole archive (issue 21).
    third = 2 * (512 + 3072)
    (ws.root / "cut.tar").write_bytes(good[: third + 100])
    assert_user_error(cowfs("import", ws.root / "cut.tar", layer), "damaged tar archive after 2 "
                      "members", "truncated header", "nothing was imported")
    damaged = bytearray(good)
    damaged[third + 148: third + 156] = b"9999999\0"  # the third header's checksum
    (ws.root / "bad-sum.tar").write_bytes(bytes(damaged))
    assert_user_error(cowfs("import", ws.root / "bad-sum.tar", layer), "damaged", "header")
    assert not layer.exists()
    assert not any(n.startswith(".layer") for n in os.listdir(ws.root))
    assert_user_error(cowfs("import", ws.root / "missing.tar", layer), "does not exist")
    (ws.root / "full").mkdir()
    (ws.root / "full/x").write_text("keep me")
    (ws.root / "ok.tar").write_bytes(good)
    assert_user_error(cowfs("import", ws.root / "ok.tar", ws.root / "full"), "not an empty")
    assert (ws.root / "full/x").read_text() == "keep me"


def test_export_bad_input(workspace: Workspace) -> None:
    ws = workspace
    assert_user_error(cowfs("export", ws.root / "nothing", "-o", ws.root / "x.tar"),
                      "does not exist")
    (ws.root / "file").write_text("x")
    assert_user_error(cowfs("export", "--lower", ws.base, ws.upper, "-o",
                            ws.root / "file/dir/x.tar"), "is not a directory")
    (ws.root / "out").mkdir()
    assert_user_error(cowfs("export", "--lower", ws.base, ws.upper, "-o", ws.root / "out"),
                      "is a directory")
    assert_user_error(cowfs("export", "--lower", ws.base, ws.upper, "-o", ws.root / "x.tar.zst"),
                      "zstd")
    assert not (ws.root / "x.tar").exists()
    assert os.listdir(ws.root / "out") == []


def test_export_and_import_create_missing_parents(workspace: Workspace) -> None:
    """Like ``mkdir -p``: the directories named for the output are created."""
    ws = workspace
    result = cowfs("export", "--lower", ws.base, ws.upper, "-o", ws.root / "new/dir/x.tar")
    assert result.status == 0, result
    result = cowfs("import", ws.root / "new/dir/x.tar", ws.root / "layers/deep/l1")
    assert result.status == 0, result
    assert (ws.root / "layers/deep/l1").is_dir()


def _gzip_header(path: Path) -> tuple[int, int]:
    """The FLG byte and MTIME field of a gzip member's header (RFC 1952)."""
    head = path.read_bytes()[:10]
    assert head[:2] == b"\x1f\x8b", "not gzip"
    return head[3], int.from_bytes(head[4:8], "little")


def test_a_gzipped_export_is_the_same_bytes_every_time(workspace: Workspace) -> None:
    """The gzip header holds no file name and time 0 (tarfile's own ``w:gz`` wrote the temporary
    file's name and the time of now), so the same upper gives the same bytes, to a file and to
    stdout alike."""
    ws = workspace
    with cowfs_mount([ws.base], ws.upper, ws.mnt):
        make_changes(ws.mnt)
    written = []
    for name in ("one.tar.gz", "two.tgz", "three.tar"):
        args = ["export", "--lower", ws.base, ws.upper, "-o", ws.root / name]
        result = cowfs(*args, *(["--gzip"] if name.endswith(".tar") else []))
        assert result.status == 0, result
        written.append((ws.root / name).read_bytes())
    with open(ws.root / "stdout.tgz", "wb") as out:
        piped = subprocess.run([str(find_cowfs()), "export", "--gzip", "--lower", str(ws.base),
                                str(ws.upper), "-o", "-"], stdout=out, stderr=subprocess.PIPE,
                               timeout=120, check=False)
    assert piped.returncode == 0, piped.stderr
    written.append((ws.root / "stdout.tgz").read_bytes())
    assert written[1:] == written[:1] * 3
    flags, mtime = _gzip_header(ws.root / "one.tar.gz")
    assert flags & 0x08 == 0, "FNAME is set: the header names a file"
    assert mtime == 0
