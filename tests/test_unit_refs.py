"""Name references without a mount (cowfs.core.refs, issue 19): an object is reached again by its
parent and its name, checked to be the object the lookup saw; renames move the reference; a name
that goes pins the object; a descriptor a worker got stays open until it returns."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cowfs.core import realfs
from cowfs.core.layers import LayerPaths, open_stack
from cowfs.core.refs import Descriptors, Ref, in_worker
from cowfs.daemon.vfs import Overlay


def _root(cache: Descriptors, path: Path) -> Ref:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return cache.pinned(fd, os.fstat(fd))


def _named(cache: Descriptors, parent: Ref, name: str) -> Ref:
    return cache.named(parent, name, os.stat(name, dir_fd=parent.fd(), follow_symlinks=False))


def _ino(fd: int) -> int:
    return os.fstat(fd).st_ino


def _evict(cache: Descriptors) -> None:
    """Drop every cached descriptor (one request that ends with the cache trimmed to nothing)."""
    size, cache.size = cache.size, 0
    cache.trim()
    cache.size = size


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("f")
    return tmp_path


def test_an_object_is_reached_again_by_its_names_from_the_root(tree: Path) -> None:
    cache = Descriptors(8)
    root = _root(cache, tree)
    a = _named(cache, root, "a")
    b = _named(cache, a, "b")
    f = _named(cache, b, "f")
    _evict(cache)
    assert cache.open_count() == 0
    assert _ino(f.fd()) == (tree / "a" / "b" / "f").stat().st_ino
    assert cache.open_count() == 3  # f and the two directories above it, now cached
    cache.close()


def test_one_reference_per_directory_and_one_per_name_of_a_file(tree: Path) -> None:
    """A directory has one reference wherever it is found (its children name it as their
    parent); a file gets one per lookup, each reaching it by the name it was found at (the
    inode that the lookup makes keeps one: cowfs.inodes)."""
    cache = Descriptors(8)
    root = _root(cache, tree)
    a = _named(cache, root, "a")
    assert _named(cache, root, "a") is a
    os.link(tree / "a" / "b" / "f", tree / "a" / "g")
    f = _named(cache, _named(cache, a, "b"), "f")
    g = _named(cache, a, "g")  # a hard link: the same object
    assert g is not f
    assert (g.dev, g.ino) == (f.dev, f.ino)
    _evict(cache)
    assert _ino(g.fd()) == _ino(f.fd()) == (tree / "a" / "g").stat().st_ino
    cache.close()


def _replaced(tree: Path, replace: Callable[[], None]) -> int | None:
    """The errno of reaching ``a/b/f`` again by name after ``replace`` changed the tree (None
    when it was reached)."""
    cache = Descriptors(8)
    root = _root(cache, tree)
    f = _named(cache, _named(cache, _named(cache, root, "a"), "b"), "f")
    _evict(cache)
    replace()
    try:
        f.fd()
    except OSError as e:
        return e.errno
    finally:
        cache.close()
    return None


def test_another_object_at_the_name_is_never_reached(tree: Path) -> None:
    def another_file() -> None:
        os.rename(tree / "a" / "b" / "f", tree / "elsewhere")
        (tree / "a" / "b" / "f").write_text("another")

    assert _replaced(tree, another_file) == errno.ESTALE


def test_a_symlink_put_in_place_of_a_directory_is_not_followed(tree: Path) -> None:
    def symlink() -> None:
        os.rename(tree / "a" / "b", tree / "b-moved")
        os.symlink(tree / "b-moved", tree / "a" / "b")

    assert _replaced(tree, symlink) == errno.ESTALE


def test_a_rename_moves_the_reference_and_either_name_works_meanwhile(tree: Path) -> None:
    cache = Descriptors(8)
    root = _root(cache, tree)
    a = _named(cache, root, "a")
    b = _named(cache, a, "b")
    f = _named(cache, b, "f")
    ino = _ino(f.fd())
    assert cache.moving(b, (a, "b"), (root, "c"))
    _evict(cache)
    assert _ino(f.fd()) == ino  # by the old name: the rename is not made yet
    os.rename(tree / "a" / "b", tree / "c")
    _evict(cache)
    assert _ino(f.fd()) == ino  # by the new one: made, the reference not updated yet
    cache.moved(b)
    _evict(cache)
    assert b.where == (root, "c")
    assert _ino(f.fd()) == ino
    assert not cache.moving(b, (a, "b"), (root, "d"))  # not its name: nothing moves
    cache.close()


def test_a_name_that_goes_pins_an_object_an_inode_holds(tree: Path) -> None:
    cache = Descriptors(8)
    root = _root(cache, tree)
    f = _named(cache, _named(cache, _named(cache, root, "a"), "b"), "f")
    b = f.where[0] if f.where is not None else None
    assert b is not None
    cache.hold(f)
    cache.leaving(f, (b, "f"))
    os.unlink(tree / "a" / "b" / "f")
    _evict(cache)
    assert os.fstat(f.fd()).st_nlink == 0  # still the unlinked object
    cache.release(f)  # the last holder: the pinned descriptor is dropped
    assert f.pinned == -1
    cache.close()


def test_a_descriptor_a_worker_uses_stays_open_until_it_returns(tree: Path) -> None:
    cache = Descriptors(1)
    root = _root(cache, tree)
    a = _named(cache, root, "a")
    got, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def work() -> None:
        fd = a.fd()
        got.set()
        assert release.wait(timeout=30)
        seen.append(os.fstat(fd).st_ino)  # still open, and still the object

    thread = threading.Thread(target=in_worker, args=(work,))
    thread.start()
    assert got.wait(timeout=30)
    for i in range(20):  # the request loop fills the cache and trims it
        (tree / f"x{i}").mkdir()
        _named(cache, root, f"x{i}").fd()
        cache.trim()
    assert cache.open_count() == 2  # one cached, and the worker's
    release.set()
    thread.join(timeout=30)
    assert seen == [(tree / "a").stat().st_ino]
    assert cache.open_count() == 1  # closed by the worker, the last to use it
    cache.close()


def test_the_cache_stays_within_its_size(tree: Path) -> None:
    cache = Descriptors(16)
    root = _root(cache, tree)
    for i in range(200):
        (tree / f"f{i}").write_text("")
        _named(cache, root, f"f{i}").fd()
        cache.trim()
        assert cache.open_count() <= 16
    cache.close()


def test_a_deep_chain_is_opened_without_recursion(tmp_path: Path) -> None:
    cache = Descriptors(8)
    root = _root(cache, tmp_path)
    ref = root
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    for _ in range(1500):  # deeper than Python's stack
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=fd)
        ref = cache.named(ref, "d", os.fstat(child))
        os.close(fd)
        fd = child
    ino = _ino(fd)
    os.close(fd)
    _evict(cache)
    assert _ino(ref.fd()) == ino
    cache.trim()
    assert cache.open_count() <= cache.size
    cache.close()
    top = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        realfs.remove_tree(top, "d")  # iterative: pytest's own cleanup recurses
    finally:
        os.close(top)


def test_a_lookup_of_a_lower_file_is_one_fstatat_and_holds_no_descriptor(tmp_path: Path) -> None:
    """A plain lower non-directory is found by its ``lstat`` alone: the inode gets no descriptor,
    the lookup's attributes are that ``lstat``, and its xattrs are read by its parent and name
    without opening it (issue 19). Directories still get one (their children need it)."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "d").mkdir(parents=True)
    upper.mkdir()
    for i in range(50):
        (lower / "d" / f"f{i}").write_text(f"{i}")
    os.setxattr(lower / "d" / "f7", "user.mark", b"seven")
    os.symlink("f1", lower / "d" / "link")
    overlay = Overlay(open_stack(LayerPaths((lower,), upper)))
    try:
        d = overlay.lookup(overlay.table.root, "d")
        assert d is not None
        overlay.request_done()
        before = overlay.descriptors.open_count()
        for i in range(50):
            found = overlay.lookup_stat(d, f"f{i}")
            assert found is not None
            inode, seen = found
            assert seen is not None
            st = os.lstat(lower / "d" / f"f{i}")
            assert seen == st
            got = overlay.attributes(inode, seen)
            assert (got.ino, got.mode, got.size, got.mtime_ns) == (
                inode.number, st.st_mode, st.st_size, st.st_mtime_ns)
            overlay.request_done()
        link = overlay.lookup_stat(d, "link")
        assert link is not None
        assert overlay.readlink(link[0]) == "f1"  # reached by name when a request needs it
        assert overlay.descriptors.open_count() <= before + 1
        f7 = overlay.lookup(d, "f7")
        assert f7 is not None
        assert overlay.getxattr(f7, "user.mark") == b"seven"
        assert overlay.listxattr(f7) == ["user.mark"]
        assert overlay.descriptors.open_count() <= before + 1  # read without opening it
        assert overlay.attributes(f7).size == os.lstat(lower / "d" / "f7").st_size
    finally:
        overlay.close()
