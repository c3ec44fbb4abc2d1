"""The pyfuse3 adapter (cowfs.daemon.operations.Operations) called directly, without a mount.

Real layers are built in tmp_path and opened as the daemon opens them (``open_stack``, ``Overlay``);
each handler is awaited under ``trio.run`` as pyfuse3 would await it, as s3ql's API tests do. The
``Kernel`` below plays the kernel's part: it counts the lookups that replies carry and, at the
end, forgets them all and releases every handle, as the kernel does at unmount. The teardown then
checks that every inode was released, that no descriptor leaked, that the lowers are untouched and
that the offline checker finds nothing wrong with the layer.

readdir: pyfuse3's ``readdir_reply`` fills the kernel's buffer through a ``ReaddirToken``, whose
buffer size is set only in C when a request arrives; a token built in Python has room for nothing
(``readdir_reply`` always returns False). So the listing tests pass a fake token with a capacity
and put a fake ``readdir_reply`` in its place, which records the entries (``FakeToken``); one test
also calls the handler with a real token.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from support import (
    DEFAULT_WORK_NAME,
    RENAME_NOREPLACE,
    File,
    assert_same_tree,
    build_layer,
    layer_problems,
    tree_state,
)

from cowfs.core.layers import LayerPaths, open_stack
from cowfs.daemon import fileattr
from cowfs.daemon.operations import Operations
from cowfs.daemon.vfs import Overlay

ROOT = pyfuse3.ROOT_INODE
CTX = pyfuse3.RequestContext()  # uid 0, gid 0, umask 0

# Bottom layer first in the list below, as build order does not matter; the stack is
# [LOWER0, LOWER1] with LOWER0 on top. Every file's content is "<layer>:<path>".
LOWER0 = {"a.txt": None, "dir/y": None, "only0": None}
LOWER1 = {
    "a.txt": None,
    "b.txt": None,
    "dir/x": None,
    "dir/y": None,
    "x.txt": File(xattrs={"user.note": "lower"}),
}
UPPER = {"u.txt": None, "dir/u": None}
ROOT_NAMES = {".", "..", "a.txt", "b.txt", "dir", "only0", "u.txt", "x.txt"}


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class FakeToken:
    """Stands for the kernel's readdir buffer: room for ``capacity`` entries."""

    def __init__(self, capacity: int, inode: int = 0, plus: bool = True) -> None:
        self.capacity = capacity
        self.inode = inode  # the directory (ReaddirToken.inode, patches/pyfuse3/0001)
        self.plus = plus  # False: a listing without attributes (ReaddirToken.plus)
        self.entries: list[tuple[str, int, int]] = []  # (name, d_ino, next_id)
        #: Names replied with node id 0: the kernel links no inode and counts no lookup.
        self.unlinked: set[str] = set()


def _d_ino(attr: pyfuse3.EntryAttributes) -> int:
    """The entry's ``d_ino``: ``fuse_entry_param.attr.st_ino``, after the node id, the generation
    and ``st_dev`` (the property ``st_ino`` reads the node id; the setter sets both)."""
    return ctypes.c_uint64.from_address(id(attr) + object.__basicsize__ + 24).value


def fake_readdir_reply(
    token: FakeToken, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int
) -> bool:
    if len(token.entries) >= token.capacity:
        return False
    node, d_ino = attr.st_ino, _d_ino(attr)
    assert node in (0, d_ino), (name, node, d_ino)  # the layout _d_ino reads
    token.entries.append((os.fsdecode(name), d_ino, next_id))
    if node == 0:
        token.unlinked.add(os.fsdecode(name))
    return True


class Kernel:
    """Calls the handlers as pyfuse3 does and keeps the kernel's books: lookups and handles."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops
        self.lookups: Counter[int] = Counter()
        self.files: set[int] = set()
        self.dirs: set[int] = set()
        #: Directories the kernel opened by itself (opendir answered ENOSYS): our own negative
        #: handle -> inode; the handlers then see handle 0 and the token's inode.
        self.kernel_dirs: dict[int, int] = {}
        #: The names the last readdir replied with node id 0 (no inode linked, no lookup).
        self.last_unlinked: set[str] = set()

    def run(self, handler: Callable[..., Any], *args: Any) -> Any:
        return trio.run(handler, *args)

    def counted(self, entry: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        if entry.st_ino:
            self.lookups[entry.st_ino] += 1
        return entry

    def lookup(self, parent: int, name: str) -> pyfuse3.EntryAttributes:
        return self.counted(self.run(self.ops.lookup, parent, os.fsencode(name), CTX))

    def ino(self, path: str) -> int:
        """Look up each component of ``path`` from the root; its inode number."""
        number = ROOT
        for name in path.split("/"):
            number = self.lookup(number, name).st_ino
            assert number, f"{path}: {name} not found"
        return number

    def getattr(self, number: int) -> pyfuse3.EntryAttributes:
        return self.run(self.ops.getattr, number, CTX)

    def create(self, parent: int, name: str, mode: int) -> tuple[int, pyfuse3.EntryAttributes]:
        info, entry = self.run(self.ops.create, parent, os.fsencode(name), mode,
                               os.O_RDWR | os.O_CREAT, CTX)
        self.files.add(info.fh)
        return info.fh, self.counted(entry)

    def open(self, number: int, flags: int) -> int:
        fh = self.run(self.ops.open, number, flags, CTX).fh
        self.files.add(fh)
        return fh

    def release(self, fh: int) -> None:
        self.files.remove(fh)
        self.run(self.ops.release, fh)

    def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.run(self.ops.read, fh, off, size))

    def write(self, fh: int, off: int, data: bytes) -> int:
        return int(self.run(self.ops.write, fh, off, data))

    def read_file(self, number: int) -> bytes:
        fh = self.open(number, os.O_RDONLY)
        try:
            return self.read(fh, 0, 1 << 16)
        finally:
            self.release(fh)

    def mkdir(self, parent: int, name: str, mode: int = 0o755) -> pyfuse3.EntryAttributes:
        return self.counted(self.run(self.ops.mkdir, parent, os.fsencode(name), mode, CTX))

    def unlink(self, parent: int, name: str) -> None:
        self.run(self.ops.unlink, parent, os.fsencode(name), CTX)

    def rmdir(self, parent: int, name: str) -> None:
        self.run(self.ops.rmdir, parent, os.fsencode(name), CTX)

    def rename(self, old_parent: int, old: str, new_parent: int, new: str, flags: int = 0) -> None:
        self.run(self.ops.rename, old_parent, os.fsencode(old), new_parent, os.fsencode(new),
                 flags, CTX)

    def opendir(self, number: int) -> int:
        try:
            reply = self.run(self.ops.opendir, number, CTX)
        except pyfuse3.FUSEError as e:
            if e.errno != errno.ENOSYS:
                raise
            assert self.ops.kernel_opens_dirs, "ENOSYS from opendir, so the kernel opens dirs"
            fh = -1 - len(self.kernel_dirs)
            self.kernel_dirs[fh] = number
            return fh
        # A FileInfo where pyfuse3 lets the kernel cache listings (patches/pyfuse3/0001).
        fh = int(reply.fh) if isinstance(reply, pyfuse3.FileInfo) else int(reply)
        self.dirs.add(fh)
        return fh

    def releasedir(self, fh: int) -> None:
        if fh < 0:
            del self.kernel_dirs[fh]  # the kernel sends no releasedir then
            return
        self.dirs.remove(fh)
        self.run(self.ops.releasedir, fh)

    def readdir(self, fh: int, start_id: int, capacity: int,
                plus: bool = True) -> list[tuple[str, int, int]]:
        """One readdir request with room for ``capacity`` entries (needs fake_readdir_reply)."""
        token = FakeToken(capacity, self.kernel_dirs.get(fh, 0), plus)
        self.run(self.ops.readdir, max(fh, 0), start_id, token)
        self.last_unlinked = token.unlinked
        for name, ino, _ in token.entries:
            # readdirplus counts a lookup for the others, and for an entry with a node id
            if plus and name not in (".", "..") and name not in token.unlinked:
                self.lookups[ino] += 1
        return token.entries

    def listdir(self, number: int, capacity: int = 1000) -> list[str]:
        """Every name, reading ``capacity`` entries a request, each request going on at the
        offset the last entry gave."""
        fh = self.opendir(number)
        try:
            names: list[str] = []
            start = 0
            while entries := self.readdir(fh, start, capacity):
                names += [name for name, _, _ in entries]
                start = entries[-1][2]
            return names
        finally:
            self.releasedir(fh)

    def getxattr(self, number: int, name: str) -> bytes:
        return bytes(self.run(self.ops.getxattr, number, os.fsencode(name), CTX))

    def listxattr(self, number: int) -> list[str]:
        return [os.fsdecode(n) for n in self.run(self.ops.listxattr, number, CTX)]

    def setxattr(self, number: int, name: str, value: bytes) -> None:
        self.run(self.ops.setxattr, number, os.fsencode(name), value, CTX)

    def removexattr(self, number: int, name: str) -> None:
        self.run(self.ops.removexattr, number, os.fsencode(name), CTX)

    def unmount(self) -> None:
        """What the kernel does at unmount: release every handle, forget every lookup."""
        for fh in sorted(self.files):
            self.release(fh)
        for fh in sorted(self.dirs):
            self.releasedir(fh)
        self.run(self.ops.forget, sorted(self.lookups.items()))
        self.lookups.clear()


def fuse_errno(call: Callable[..., Any], *args: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        call(*args)
    return raised.value.errno


@pytest.fixture
def layer_dirs(tmp_path: Path) -> tuple[list[Path], Path]:
    lowers = [build_layer(tmp_path / "lower0", LOWER0, "lower0"),
              build_layer(tmp_path / "lower1", LOWER1, "lower1")]
    return lowers, build_layer(tmp_path / "upper", UPPER, "upper")


@pytest.fixture(params=["handles", "kernel-opens-dirs"])
def fs(
    request: pytest.FixtureRequest, layer_dirs: tuple[list[Path], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Kernel]:
    """Both ways of listing: directory handles from opendir (a stock pyfuse3), and the kernel
    opening directories itself (ReaddirToken.inode, patches/pyfuse3/0001)."""
    lowers, upper = layer_dirs
    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_readdir_reply)
    lowers_before = {p: tree_state(p) for p in lowers}
    fds_before = open_fds()
    umask = os.umask(0)  # as the daemon runs: modes are the caller's (RequestContext.umask)
    overlay = Overlay(open_stack(LayerPaths(tuple(lowers), upper)))
    try:
        ops = Operations(overlay, timeout=1.0)
        ops.kernel_opens_dirs = request.param == "kernel-opens-dirs"
        kernel = Kernel(ops)
        yield kernel
        kernel.unmount()
        assert len(overlay.table) == 1, "inodes left after every lookup was forgotten"
    finally:
        overlay.close()
        os.umask(umask)
    assert open_fds() == fds_before, "descriptors left open"
    assert layer_problems(upper, lowers) == []
    for path, state in lowers_before.items():
        assert_same_tree(state, tree_state(path), f"lower layer {path}")


def upper_of(layer_dirs: tuple[list[Path], Path]) -> Path:
    return layer_dirs[1]


def test_close_releases_every_descriptor(layer_dirs: tuple[list[Path], Path]) -> None:
    lowers, upper = layer_dirs
    before = open_fds()
    Overlay(open_stack(LayerPaths(tuple(lowers), upper))).close()
    assert open_fds() == before


# --- lookup and getattr -------------------------------------------------------------------------


def test_lookup_finds_each_name_in_the_topmost_layer_that_has_it(fs: Kernel) -> None:
    for name, content in [("a.txt", "lower0:a.txt"), ("b.txt", "lower1:b.txt"),
                          ("u.txt", "upper:u.txt")]:
        entry = fs.lookup(ROOT, name)
        assert stat.S_ISREG(entry.st_mode), name
        assert entry.st_size == len(content), name
        assert fs.read_file(entry.st_ino) == content.encode(), name
        assert fs.getattr(entry.st_ino).st_ino == entry.st_ino
        assert fs.lookup(ROOT, name).st_ino == entry.st_ino, "a second lookup: the same inode"
    assert stat.S_ISDIR(fs.lookup(ROOT, "dir").st_mode)


def test_a_missing_name_and_the_work_directory_are_negative_entries(fs: Kernel) -> None:
    assert fs.lookup(ROOT, "missing").st_ino == 0
    assert fs.lookup(ROOT, DEFAULT_WORK_NAME).st_ino == 0
    assert fs.lookup(fs.ino("dir"), "missing").st_ino == 0


def test_getattr_of_an_unknown_inode_is_estale(fs: Kernel) -> None:
    assert fuse_errno(fs.getattr, 987654) == errno.ESTALE


# --- files --------------------------------------------------------------------------------------


def test_create_write_read(fs: Kernel, layer_dirs: tuple[list[Path], Path]) -> None:
    fh, entry = fs.create(fs.ino("dir"), "new", 0o640)
    assert stat.S_IMODE(entry.st_mode) == 0o640
    assert (entry.st_uid, entry.st_gid) == (0, 0)
    assert fs.write(fh, 0, b"hello world") == 11
    assert fs.write(fh, 6, b"there") == 5
    assert fs.read(fh, 0, 100) == b"hello there"
    assert fs.read(fh, 6, 3) == b"the"
    fs.release(fh)
    assert fs.getattr(entry.st_ino).st_size == 11
    assert fs.lookup(fs.ino("dir"), "new").st_ino == entry.st_ino
    assert (upper_of(layer_dirs) / "dir/new").read_bytes() == b"hello there"
    assert fuse_errno(fs.create, ROOT, "u.txt", 0o644) == errno.EEXIST


def test_writing_a_lower_file_copies_it_up(fs: Kernel, layer_dirs: tuple[list[Path], Path]) -> None:
    number = fs.ino("a.txt")
    fh = fs.open(number, os.O_WRONLY)
    assert fs.write(fh, 0, b"L") == 1
    fs.release(fh)
    assert (upper_of(layer_dirs) / "a.txt").read_bytes() == b"Lower0:a.txt"
    assert fs.read_file(number) == b"Lower0:a.txt"
    assert fs.getattr(number).st_ino == number, "copy-up keeps the inode number"


def test_a_partial_file_is_read_and_written_through_its_inodes_record(tmp_path: Path) -> None:
    """A large lower file opened for writing is copied up partly (cowfs.core.partial): its
    handles read and write through the inode's record (daemon/upperdata.py), which records the
    map before the write is answered; getattr asks it; the forget and release at unmount leave
    no descriptor of it open and the layer consistent."""
    big = bytes(range(256)) * 1024  # 256 KiB: four 64 KiB blocks
    lower = build_layer(tmp_path / "lower", {"big": File(big)}, "lower")
    upper = build_layer(tmp_path / "upper", {}, "upper")
    fds_before = open_fds()
    overlay = Overlay(open_stack(LayerPaths((lower,), upper)), partial_min=1)
    try:
        kernel = Kernel(Operations(overlay, timeout=1.0))
        number = kernel.ino("big")
        fh = kernel.open(number, os.O_RDWR)
        if "user.cowfs.datamap" not in os.listxattr(upper / "big"):
            kernel.unmount()
            pytest.skip("the upper's filesystem clones the file whole instead (reflinks)")
        assert kernel.write(fh, 70_000, b"PATCH") == 5  # block 1 comes up
        assert os.getxattr(upper / "big", "user.cowfs.datamap").endswith(b" 1-2")
        expected = bytearray(big)
        expected[70_000:70_005] = b"PATCH"
        assert kernel.read(fh, 60_000, 20_000) == bytes(expected[60_000:80_000])
        assert kernel.read_file(number) == bytes(expected[:1 << 16])
        assert kernel.getattr(number).st_size == len(big)
        kernel.unmount()
        assert len(overlay.table) == 1, "inodes left after every lookup was forgotten"
    finally:
        overlay.close()
    assert open_fds() == fds_before, "descriptors left open"
    assert layer_problems(upper, [lower]) == []


def test_read_and_write_need_an_open_handle(fs: Kernel) -> None:
    assert fuse_errno(fs.read, 4242, 0, 10) == errno.EBADF
    assert fuse_errno(fs.write, 4242, 0, b"x") == errno.EBADF


def test_a_directory_cannot_be_opened_as_a_file_nor_a_file_as_a_directory(fs: Kernel) -> None:
    assert fuse_errno(fs.open, fs.ino("dir"), os.O_RDONLY) == errno.EINVAL
    assert fuse_errno(fs.opendir, fs.ino("a.txt")) == errno.ENOTDIR


# --- namespace ----------------------------------------------------------------------------------


def test_unlink_of_lower_upper_and_missing_names(
    fs: Kernel, layer_dirs: tuple[list[Path], Path]
) -> None:
    fs.unlink(ROOT, "b.txt")  # only in lower1: needs a whiteout
    fs.unlink(ROOT, "u.txt")  # only in the upper: removed there
    assert fs.lookup(ROOT, "b.txt").st_ino == 0
    assert fs.lookup(ROOT, "u.txt").st_ino == 0
    assert not (upper_of(layer_dirs) / "u.txt").exists()
    assert fuse_errno(fs.unlink, ROOT, "b.txt") == errno.ENOENT
    assert fuse_errno(fs.unlink, ROOT, "missing") == errno.ENOENT


def test_mkdir_and_rmdir(fs: Kernel) -> None:
    assert stat.S_IMODE(fs.mkdir(ROOT, "fresh", 0o750).st_mode) == 0o750
    assert fuse_errno(fs.mkdir, ROOT, "fresh") == errno.EEXIST
    assert fuse_errno(fs.mkdir, ROOT, "dir") == errno.EEXIST
    assert fuse_errno(fs.rmdir, ROOT, "dir") == errno.ENOTEMPTY
    assert fuse_errno(fs.rmdir, ROOT, "a.txt") == errno.ENOTDIR
    fs.rmdir(ROOT, "fresh")
    assert fs.lookup(ROOT, "fresh").st_ino == 0


def test_rename_of_a_lower_file_and_of_a_merged_directory(fs: Kernel) -> None:
    number = fs.ino("a.txt")
    fs.rename(ROOT, "a.txt", ROOT, "c.txt")
    assert fs.lookup(ROOT, "a.txt").st_ino == 0
    assert fs.lookup(ROOT, "c.txt").st_ino == number
    assert fs.read_file(number) == b"lower0:a.txt"
    fs.rename(ROOT, "dir", ROOT, "dir2")
    assert fs.lookup(ROOT, "dir").st_ino == 0
    assert sorted(fs.listdir(fs.ino("dir2"))) == [".", "..", "u", "x", "y"]
    assert fuse_errno(fs.rename, ROOT, "c.txt", ROOT, "b.txt", RENAME_NOREPLACE) == errno.EEXIST
    assert fuse_errno(fs.rename, ROOT, "missing", ROOT, "m2") == errno.ENOENT


# --- readdir ------------------------------------------------------------------------------------


def test_readdir_lists_the_merged_directory_without_the_work_directory(fs: Kernel) -> None:
    names = fs.listdir(ROOT)
    assert set(names) == ROOT_NAMES
    assert len(names) == len(ROOT_NAMES), "every name once"
    assert sorted(fs.listdir(fs.ino("dir"))) == [".", "..", "u", "x", "y"]


def test_readdir_leaves_out_whited_out_names(fs: Kernel) -> None:
    fs.unlink(ROOT, "b.txt")
    fs.unlink(fs.ino("dir"), "x")
    assert set(fs.listdir(ROOT)) == ROOT_NAMES - {"b.txt"}
    assert sorted(fs.listdir(fs.ino("dir"))) == [".", "..", "u", "y"]


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_readdir_goes_on_at_each_offset_it_gave(fs: Kernel, capacity: int) -> None:
    names = fs.listdir(ROOT, capacity)
    assert sorted(names) == sorted(ROOT_NAMES)


def test_two_readers_of_a_changing_directory_each_see_every_name_once(fs: Kernel) -> None:
    """Each reader goes on in the listing it started (its offsets name it), also when the kernel
    opens directories itself and every request carries handle 0."""
    first, second = fs.opendir(ROOT), fs.opendir(ROOT)
    try:
        part = fs.readdir(first, 0, 3)
        fs.mkdir(ROOT, "made-between")
        other = fs.readdir(second, 0, 1000)
        fs.unlink(ROOT, "b.txt")
        rest = fs.readdir(first, part[-1][2], 1000)
    finally:
        fs.releasedir(first)
        fs.releasedir(second)
    names = [n for n, _, _ in part + rest]
    assert len(names) == len(set(names)), names
    # The listing taken before both changes: without the new name, and with every other name
    # (the removed one may or may not be listed, as POSIX allows).
    assert set(names) - {"b.txt"} == ROOT_NAMES - {"b.txt"}
    assert sorted(n for n, _, _ in other) == sorted(ROOT_NAMES | {"made-between"})


@pytest.mark.parametrize("capacity", [2, 1000])
def test_a_listing_without_attributes_shows_what_readdirplus_shows(
        fs: Kernel, capacity: int) -> None:
    """Same names, inode numbers and offsets, and no lookup counted (the fixture's teardown
    checks that every counted lookup was given back)."""
    fs.unlink(ROOT, "b.txt")  # a whiteout over a lower file
    fs.create(ROOT, "new.txt", 0o644)  # an upper file
    fs.setxattr(fs.ino("x.txt"), "user.a", b"1")  # a copied-up lower file: origin numbering
    fs.mkdir(ROOT, "made")
    fs.create(fs.ino("made"), "f", 0o644)
    for directory in (ROOT, fs.ino("dir"), fs.ino("made")):
        fh = fs.opendir(directory)
        try:
            plus: list[tuple[str, int, int]] = []
            plain: list[tuple[str, int, int]] = []
            for out, with_attrs in ((plus, True), (plain, False)):
                start = 0
                while entries := fs.readdir(fh, start, capacity, plus=with_attrs):
                    out += entries
                    start = entries[-1][2]
        finally:
            fs.releasedir(fh)
        assert [(n, i) for n, i, _ in plain] == [(n, i) for n, i, _ in plus]


def test_readdirplus_leaves_out_the_inodes_the_kernel_holds_under_the_name(fs: Kernel) -> None:
    """A lower name looked up already gets an entry without a node id (node id 0: the kernel
    keeps the dentry it has, and counts no lookup), with the number the lookup gave; the others
    a whole entry, one lookup counted (the fixture's teardown checks that every counted lookup
    was given back). ``git status`` lists every directory after a walk of its files. An upper
    or merged object gets a whole entry (only a lookup tells its number), as does a name whose
    object the kernel holds under another name only."""
    held = {name: fs.lookup(ROOT, name).st_ino for name in ("a.txt", "x.txt", "only0")}
    looked_up = {name: fs.lookup(ROOT, name).st_ino for name in ("u.txt", "dir")}
    fh = fs.opendir(ROOT)
    try:
        entries = {name: ino for name, ino, _ in fs.readdir(fh, 0, 100)}
    finally:
        fs.releasedir(fh)
    assert fs.last_unlinked == set(held)
    assert {name: entries[name] for name in held} == held
    assert {name: entries[name] for name in looked_up} == looked_up
    for name in ROOT_NAMES - {".", ".."} - set(held) - set(looked_up):
        assert entries[name] == fs.lookup(ROOT, name).st_ino, name
    number = held["x.txt"]  # the kernel forgets it: listed whole again
    fs.run(fs.ops.forget, [(number, fs.lookups.pop(number))])
    fh = fs.opendir(ROOT)
    try:
        fs.readdir(fh, 0, 100)
    finally:
        fs.releasedir(fh)
    assert fs.last_unlinked == {"a.txt", "only0", "b.txt"}  # b.txt: held since the listing


def test_readdir_entries_carry_the_lookup_attributes(fs: Kernel) -> None:
    fh = fs.opendir(ROOT)
    entries = {name: ino for name, ino, _ in fs.readdir(fh, 0, 100)}
    fs.releasedir(fh)
    for name in ROOT_NAMES - {".", ".."}:
        assert entries[name] == fs.lookup(ROOT, name).st_ino, name


def test_readdir_with_a_token_from_outside_a_request(
    fs: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ReaddirToken made in Python has a buffer of size 0: nothing fits, and the handler
    must stop at once, without counting a lookup the kernel never got."""
    if fs.ops.kernel_opens_dirs:
        pytest.skip("a ReaddirToken made in Python names no directory (inode 0)")
    monkeypatch.undo()  # the real readdir_reply
    fh = fs.opendir(fs.ino("dir"))
    inodes_before = len(fs.ops.overlay.table)
    fs.run(fs.ops.readdir, fh, 0, pyfuse3.ReaddirToken())
    fs.run(fs.ops.readdir, fh, 2, pyfuse3.ReaddirToken())  # past "." and "..": a real entry
    assert len(fs.ops.overlay.table) == inodes_before
    fs.releasedir(fh)


# --- xattrs -------------------------------------------------------------------------------------


def test_layer_metadata_xattrs_are_hidden(fs: Kernel, layer_dirs: tuple[list[Path], Path]) -> None:
    number = fs.ino("x.txt")
    fs.setxattr(number, "user.added", b"1")  # copies x.txt up: the upper copy has cowfs's xattrs
    stored = os.listxattr(upper_of(layer_dirs) / "x.txt")
    assert any(n.startswith(("user.cowfs.", "user.overlay.")) for n in stored), stored
    assert sorted(fs.listxattr(number)) == ["user.added", "user.note"]
    assert fs.getxattr(number, "user.note") == b"lower"
    for name in stored:
        if name.startswith("user.cowfs."):
            assert fuse_errno(fs.getxattr, number, name) == errno.ENODATA
            assert fuse_errno(fs.setxattr, number, name, b"x") == errno.EPERM
            assert fuse_errno(fs.removexattr, number, name) == errno.EPERM


def test_an_overlay_named_user_xattr_is_escaped(
    fs: Kernel, layer_dirs: tuple[list[Path], Path]
) -> None:
    number = fs.ino("u.txt")
    fs.setxattr(number, "user.overlay.mine", b"v")
    assert fs.getxattr(number, "user.overlay.mine") == b"v"
    assert fs.listxattr(number) == ["user.overlay.mine"]
    real = upper_of(layer_dirs) / "u.txt"
    assert os.getxattr(real, "user.overlay.overlay.mine") == b"v"
    fs.removexattr(number, "user.overlay.mine")
    assert fs.listxattr(number) == []
    assert fuse_errno(fs.getxattr, number, "user.overlay.mine") == errno.ENODATA
    assert fuse_errno(fs.removexattr, number, "user.overlay.mine") == errno.ENODATA


# --- fallocate, lseek and the file-attribute ioctls (patches/pyfuse3/0002) ---------------------


def _real_flags(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return int.from_bytes(fileattr.get(fd, fileattr.FS_IOC_GETFLAGS, 4), sys.byteorder)
    finally:
        os.close(fd)


def test_fallocate_and_seek_on_the_upper_copy(
        fs: Kernel, layer_dirs: tuple[list[Path], Path]) -> None:
    fs.ops.file_calls = True  # the handlers called directly, whatever this pyfuse3 would call
    number = fs.ino("a.txt")
    fh = fs.open(number, os.O_RDWR)  # copies it up
    try:
        fs.run(fs.ops.fallocate, fh, 0, 0, 1 << 20)
        assert (upper_of(layer_dirs) / "a.txt").stat().st_size == 1 << 20
        real = os.open(upper_of(layer_dirs) / "a.txt", os.O_RDONLY)
        try:  # whatever the upper's filesystem says of its unwritten extents
            for whence in (os.SEEK_DATA, os.SEEK_HOLE):
                assert fs.run(fs.ops.lseek, fh, 0, whence) == os.lseek(real, 0, whence)
        finally:
            os.close(real)
        assert fuse_errno(fs.run, fs.ops.lseek, fh, 1 << 20, os.SEEK_DATA) == errno.ENXIO
    finally:
        fs.release(fh)
    reader = fs.open(fs.ino("b.txt"), os.O_RDONLY)
    try:  # the kernel sends fallocate only on handles open for writing: refused otherwise
        assert fuse_errno(fs.run, fs.ops.fallocate, reader, 0, 0, 10) == errno.EBADF
    finally:
        fs.release(reader)


def test_file_attributes_are_read_from_the_top_and_set_on_a_copy(
        fs: Kernel, layer_dirs: tuple[list[Path], Path]) -> None:
    lowers, upper = layer_dirs
    fs.ops.file_calls = True  # the handlers called directly, whatever this pyfuse3 would call
    number = fs.ino("b.txt")
    fh = fs.open(number, os.O_RDONLY)
    try:
        flags = fs.run(fs.ops.ioctl, number, fh, fileattr.FS_IOC_GETFLAGS, 0, b"", 4, CTX)
        assert int.from_bytes(flags, sys.byteorder) == _real_flags(lowers[1] / "b.txt")
        wanted = _real_flags(lowers[1] / "b.txt") | 0x40  # FS_NODUMP_FL
        fs.run(fs.ops.ioctl, number, fh, fileattr.FS_IOC_SETFLAGS, 0,
               wanted.to_bytes(4, sys.byteorder), 0, CTX)
        assert _real_flags(upper / "b.txt") & 0x40
        assert not _real_flags(lowers[1] / "b.txt") & 0x40, "the lower is never written"
        assert fuse_errno(fs.run, fs.ops.ioctl, number, fh, 0x5401, 0, b"", 0, CTX) == \
            errno.ENOTTY  # TCGETS: only the four file-attribute commands are passed on
        assert fuse_errno(fs.run, fs.ops.ioctl, number, fh, fileattr.FS_IOC_SETFLAGS, 0,
                          b"\0" * 3, 0, CTX) == errno.EINVAL
        fs.ops.file_calls = False  # as on a stock pyfuse3: what libfuse answers
        assert fuse_errno(fs.run, fs.ops.ioctl, number, fh, fileattr.FS_IOC_GETFLAGS, 0, b"",
                          4, CTX) == errno.ENOSYS
        assert fuse_errno(fs.run, fs.ops.lseek, fh, 0, os.SEEK_DATA) == errno.ENOSYS
    finally:
        fs.release(fh)


def test_unknown_directory_handles_are_ebadf(fs: Kernel) -> None:
    if fs.ops.kernel_opens_dirs:
        pytest.skip("the kernel opens directories itself: no directory handles")
    token = FakeToken(10, 0, True)
    assert fuse_errno(fs.run, fs.ops.readdir, 4242, 0, token) == errno.EBADF
    assert fuse_errno(fs.run, fs.ops.fsyncdir, 4242, False) == errno.EBADF
    assert fuse_errno(fs.run, fs.ops.releasedir, 4242) == errno.EBADF


def test_a_released_inode_is_estale(fs: Kernel) -> None:
    """What a request still holding an inode sees once a forget released it (a file handle's
    release queued behind the kernel's forget, a read racing it): ESTALE, which the boundary
    passes on, not an IndexError that surfaced as EIO with a traceback."""
    number = fs.ino("a.txt")
    inode = fs.ops.overlay.inode(number)
    fs.run(fs.ops.forget, [(number, fs.lookups.pop(number))])
    for use in (lambda: inode.top, lambda: inode.upper, lambda: inode.is_dir):
        with pytest.raises(OSError) as raised:
            use()
        assert raised.value.errno == errno.ESTALE
    assert fuse_errno(fs.getattr, number) == errno.ESTALE
