"""The overlay model called directly, without FUSE (as s3ql's API tests call its handlers).

Fast checks of the namespace logic; every test ends by checking the upper layer's invariants and
that the lower layer is unchanged. Behaviour through a real mount is tested in test_mount_*.py.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowfs.core import realfs, schema
from cowfs.core.layers import LayerPaths, open_stack
from cowfs.daemon.inodes import Inode
from cowfs.daemon.namespace import Caller
from cowfs.daemon.vfs import Overlay, SetAttr

ROOT = Caller(0, 0, 0o022)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a tree that must not change, atime aside."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            st = p.lstat()
            data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            xattrs = sorted((n, os.getxattr(p, n, follow_symlinks=False))
                            for n in os.listxattr(p, follow_symlinks=False))
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns,
                                             st.st_ctime_ns, data, tuple(xattrs))
    return out


def check_upper_invariants(upper: Path) -> None:
    """What any cowfs upper must satisfy (a tiny offline checker)."""
    assert os.getxattr(upper, schema.XATTR_FORMAT) == schema.FORMAT_VERSION
    assert os.listdir(upper / schema.WORK_DIR_NAME / schema.WORK_TMP_NAME) == []
    for dirpath, _, filenames in os.walk(upper):
        for name in filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                continue
            if stat.S_ISREG(p.lstat().st_mode) and schema.XATTR_WHITEOUT in os.listxattr(p):
                assert p.stat().st_size == 0
                assert os.getxattr(dirpath, schema.XATTR_OPAQUE) == b"x", f"{p}: parent unmarked"


def is_whiteout(path: Path) -> bool:
    """cowfs writes the kernel's whiteouts (0/0 character devices) where the upper supports them."""
    st = path.lstat()
    return schema.is_device_whiteout(st.st_mode, st.st_rdev)


class Model:
    def __init__(self, tmp: Path) -> None:
        self.lower = tmp / "lower"
        self.upper = tmp / "upper"
        self.upper.mkdir()
        self.overlay: Overlay | None = None

    def start(self) -> Overlay:
        self.before = snapshot(self.lower)
        self.overlay = Overlay(open_stack(LayerPaths((self.lower,), self.upper)))
        return self.overlay

    @property
    def ov(self) -> Overlay:
        assert self.overlay is not None
        return self.overlay

    def walk(self, path: str) -> Inode:
        node = self.ov.table.root
        for part in filter(None, path.split("/")):
            found = self.ov.lookup(node, part)
            if found is None:
                raise FileNotFoundError(path)
            node = found
        return node

    def parent_and_name(self, path: str) -> tuple[Inode, str]:
        head, _, name = path.rpartition("/")
        return self.walk(head), name

    def read(self, path: str) -> bytes:
        handle = self.ov.open(self.walk(path), os.O_RDONLY)
        try:
            return handle.read(0, 1 << 20)
        finally:
            handle.close()

    def names(self, path: str) -> set[str]:
        directory = self.walk(path)
        handle = self.ov.opendir(directory)
        listed = handle.snapshot(0, self.ov.listing)[2:]
        return {n for n in listed if self.ov.lookup(directory, n) is not None}


@pytest.fixture
def model(tmp_path: Path) -> Iterator[Model]:
    m = Model(tmp_path)
    lower = m.lower
    (lower / "dir" / "sub").mkdir(parents=True)
    (lower / "file").write_bytes(b"lower:file")
    (lower / "dir" / "a").write_bytes(b"lower:a")
    (lower / "dir" / "sub" / "deep").write_bytes(b"lower:deep")
    os.setxattr(lower / "file", "user.tag", b"t")
    os.chmod(lower / "file", 0o640)
    os.utime(lower / "file", ns=(1_000_000_123, 2_000_000_456))
    os.symlink("file", lower / "link")
    yield m
    if m.overlay is not None:
        m.overlay.close()
        check_upper_invariants(m.upper)
        assert snapshot(m.lower) == m.before, "the lower layer changed"


def test_lookup_and_read_from_lower(model: Model) -> None:
    model.start()
    assert model.read("file") == b"lower:file"
    assert model.names("") == {"file", "dir", "link"}
    assert model.ov.readlink(model.walk("link")) == "file"


def test_open_for_write_copies_up_with_metadata(model: Model) -> None:
    ov = model.start()
    inode = model.walk("file")
    handle = ov.open(inode, os.O_WRONLY)
    handle.write(10, b"+more")
    handle.close()
    copy = model.upper / "file"
    assert copy.read_bytes() == b"lower:file+more"
    st = copy.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert os.getxattr(copy, "user.tag") == b"t"
    assert model.read("file") == b"lower:file+more"


def test_read_only_open_does_not_copy_up(model: Model) -> None:
    model.start()
    assert model.read("file") == b"lower:file"
    assert not (model.upper / "file").exists()


def test_copy_up_keeps_times_and_parent_times(model: Model) -> None:
    ov = model.start()
    ov.setattr(model.walk("dir/a"), SetAttr(mode=0o600), None)
    assert stat.S_IMODE((model.upper / "dir" / "a").stat().st_mode) == 0o600
    assert (model.upper / "dir").stat().st_mtime_ns == (model.lower / "dir").stat().st_mtime_ns
    ov.setattr(model.walk("file"), SetAttr(uid=1234), None)
    st = (model.upper / "file").stat()
    lower_atime = (model.lower / "file").stat().st_atime_ns  # reading the lower may update it
    assert (st.st_uid, st.st_atime_ns, st.st_mtime_ns) == (1234, lower_atime, 2_000_000_456)


def test_truncate_to_zero_copies_no_data(model: Model) -> None:
    ov = model.start()
    ov.setattr(model.walk("file"), SetAttr(size=0), None)
    assert (model.upper / "file").read_bytes() == b""


def test_sparse_copy_up_keeps_holes(model: Model) -> None:
    with open(model.lower / "sparse", "wb") as f:
        f.seek(64 << 20)
        f.write(b"end")
    ov = model.start()
    ov.open(model.walk("sparse"), os.O_RDWR).close()
    copy = model.upper / "sparse"
    assert copy.stat().st_size == (64 << 20) + 3
    assert copy.stat().st_blocks * 512 < 1 << 20


def test_unlink_lower_file_leaves_whiteout(model: Model) -> None:
    model.start()
    parent, name = model.parent_and_name("dir/a")
    model.ov.namespace.unlink(parent, name)
    assert "a" not in model.names("dir")
    assert is_whiteout(model.upper / "dir" / "a")


def test_unlink_upper_only_file_leaves_nothing(model: Model) -> None:
    ov = model.start()
    handle = ov.create(ov.table.root, "new", 0o644, ROOT)
    handle.close()
    ov.namespace.unlink(ov.table.root, "new")
    assert not (model.upper / "new").exists()


def test_rmdir_of_merged_directory(model: Model) -> None:
    ns = model.start().namespace
    with pytest.raises(OSError, match="not empty") as exc:
        ns.rmdir(*model.parent_and_name("dir/sub"))
    assert exc.value.errno == errno.ENOTEMPTY
    ns.unlink(*model.parent_and_name("dir/sub/deep"))
    ns.rmdir(*model.parent_and_name("dir/sub"))
    assert model.names("dir") == {"a"}
    assert is_whiteout(model.upper / "dir" / "sub")


def test_mkdir_over_whiteout_is_opaque(model: Model) -> None:
    ns = model.start().namespace
    ns.unlink(*model.parent_and_name("dir/sub/deep"))
    ns.rmdir(*model.parent_and_name("dir/sub"))
    ns.mkdir(*model.parent_and_name("dir/sub"), 0o755, ROOT)
    assert model.names("dir/sub") == set()
    assert os.getxattr(model.upper / "dir" / "sub", schema.XATTR_OPAQUE) == b"y"


def test_create_over_whiteout_replaces_it(model: Model) -> None:
    ov = model.start()
    ov.namespace.unlink(ov.table.root, "file")
    handle = ov.create(ov.table.root, "file", 0o600, Caller(1000, 1000, 0o077))
    handle.write(0, b"new")
    handle.close()
    assert model.read("file") == b"new"
    st = (model.upper / "file").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)
    assert not is_whiteout(model.upper / "file")


def test_rename_lower_file_copies_up_and_whites_out(model: Model) -> None:
    ov = model.start()
    ov.namespace.rename(ov.table.root, "file", model.walk("dir"), "moved", 0)
    assert model.read("dir/moved") == b"lower:file"
    assert "file" not in model.names("")
    assert is_whiteout(model.upper / "file")


def test_rename_exchange_and_noreplace(model: Model) -> None:
    ov = model.start()
    root, d = ov.table.root, model.walk("dir")
    with pytest.raises(OSError, match="exists") as exc:
        ov.namespace.rename(root, "file", d, "a", realfs.RENAME_NOREPLACE)
    assert exc.value.errno == errno.EEXIST
    ov.namespace.rename(root, "file", d, "a", realfs.RENAME_EXCHANGE)
    assert model.read("file") == b"lower:a"
    assert model.read("dir/a") == b"lower:file"


def test_rename_directory_with_lower_content_redirects(model: Model) -> None:
    ov = model.start()
    root = ov.table.root
    ov.namespace.rename(root, "dir", root, "renamed", 0)
    assert model.names("renamed") == {"a", "sub"}
    assert model.read("renamed/sub/deep") == b"lower:deep"
    assert "dir" not in model.names("")
    assert os.getxattr(model.upper / "renamed", schema.XATTR_REDIRECT) == b"/dir"
    assert is_whiteout(model.upper / "dir")
    assert not (model.upper / "renamed" / "sub").exists(), "only the directory is copied up"


def test_redirects_survive_further_renames_and_a_remount(model: Model) -> None:
    ov = model.start()
    ns, root = ov.namespace, ov.table.root
    ns.mkdir(root, "p", 0o755, ROOT)
    ns.rename(model.walk("dir"), "sub", model.walk("p"), "s1", 0)
    ns.rename(root, "p", root, "q", 0)
    ns.rename(model.walk("q"), "s1", root, "s2", 0)
    assert model.read("s2/deep") == b"lower:deep"
    assert model.names("dir") == {"a"}
    ov.close()
    model.overlay = Overlay(open_stack(LayerPaths((model.lower,), model.upper)))
    assert model.read("s2/deep") == b"lower:deep"
    assert model.names("dir") == {"a"}
    assert model.names("q") == set()


def test_a_renamed_directory_can_be_emptied_and_removed(model: Model) -> None:
    ns = model.start().namespace
    root = model.ov.table.root
    ns.rename(root, "dir", root, "gone", 0)
    ns.unlink(*model.parent_and_name("gone/sub/deep"))
    ns.rmdir(*model.parent_and_name("gone/sub"))
    ns.unlink(*model.parent_and_name("gone/a"))
    ns.rmdir(root, "gone")
    assert model.names("") == {"file", "link"}


@pytest.mark.parametrize("bad", [b"/../outside", b"..", b"/dir/../..", b"a/b", b"/" + b"x" * 300])
def test_an_escaping_redirect_is_refused(model: Model, bad: bytes) -> None:
    (model.upper / "evil").mkdir()
    os.setxattr(model.upper / "evil", schema.XATTR_REDIRECT, bad)
    ov = model.start()
    with pytest.raises(OSError, match="invalid redirect") as exc:
        ov.lookup(ov.table.root, "evil")
    assert exc.value.errno == errno.EIO


def test_new_directory_renamed_over_lower_name_becomes_opaque(model: Model) -> None:
    ov = model.start()
    ns, root = ov.namespace, ov.table.root
    ns.unlink(*model.parent_and_name("dir/sub/deep"))
    ns.rmdir(*model.parent_and_name("dir/sub"))
    ns.mkdir(root, "fresh", 0o755, ROOT)
    ns.rename(root, "fresh", model.walk("dir"), "sub", 0)
    assert model.names("dir/sub") == set()
    assert os.getxattr(model.upper / "dir" / "sub", schema.XATTR_OPAQUE) == b"y"


def test_hard_link_of_lower_file(model: Model) -> None:
    ov = model.start()
    inode = model.walk("file")
    linked = ov.namespace.link(inode, ov.table.root, "file2")
    assert linked is inode
    assert ov.attributes(inode).nlink == 2
    assert model.read("file2") == b"lower:file"


def test_work_dir_is_hidden(model: Model) -> None:
    ov = model.start()
    assert schema.WORK_DIR_NAME not in model.names("")
    assert ov.lookup(ov.table.root, schema.WORK_DIR_NAME) is None
    with pytest.raises(OSError, match="reserved") as exc:
        ov.namespace.mkdir(ov.table.root, schema.WORK_DIR_NAME, 0o755, ROOT)
    assert exc.value.errno == errno.EPERM


def test_inodes_hold_no_descriptors(model: Model) -> None:
    """Issue 19: the descriptors a lookup opened stay in the bounded cache, not in the inodes.
    Once the cache is emptied (what the end of a request does beyond its size), the inodes,
    still known, hold none, and reach their objects again by name; forget frees them."""
    ov = model.start()
    before = len(os.listdir("/proc/self/fd"))
    inode = model.walk("dir/sub/deep")
    chain = [model.walk("dir"), model.walk("dir/sub"), inode]
    assert len(os.listdir("/proc/self/fd")) > before
    size, ov.descriptors.size = ov.descriptors.size, 0
    ov.request_done()
    ov.descriptors.size = size
    assert len(os.listdir("/proc/self/fd")) == before
    assert ov.attributes(inode).size == len(b"lower:deep")  # opened again by name
    for node in chain:
        ov.table.forget(node.number, node.lookups)
    assert not inode.alive
