"""Races on shared inode state, provoked by threads calling the model (no FUSE) at once.

Through a mount, the kernel serialises many of these pairs with its own inode and directory locks;
the model must not rely on that (worker threads run copy-ups, links, unlinks and renames side by
side, and the kernel's locks do not cover every pair). Each test hammers two operations that share
state from two threads and checks the result against a model of what it must be, then again on a
fresh Overlay over the same layers (what a remount shows).

* the link count of a lower hard-link set copied up through the index, while one thread links and
  unlinks names and another does the same elsewhere (it was an absolute counter updated
  read-modify-write, so concurrent updates were lost);
* a directory's real layers (``Inode.reals``), while one thread removes lower names in it (which
  marks it, with xattr whiteouts) and another renames it back and forth (which records its
  redirect): a lost mark made its whiteouts show as empty files;
* an inode's names (``Inode.links``), added by lookups on one thread while another iterates them to
  find a name for copy-up.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cowfs.core import realfs
from cowfs.core.layers import LayerPaths, open_stack
from cowfs.daemon.inodes import Inode
from cowfs.daemon.namespace import Caller
from cowfs.daemon.vfs import Overlay, SetAttr

pytestmark = pytest.mark.slow

ROOT = Caller(0, 0, 0o022)
ROUNDS = 300


def run_together(*workers: Callable[[], None]) -> None:
    """Run the workers in threads from one barrier; re-raise the first error any of them hit."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(workers))

    def wrap(fn: Callable[[], None]) -> None:
        barrier.wait()
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a worker thread hung"
    if errors:
        raise errors[0]


class Layers:
    def __init__(self, tmp: Path) -> None:
        self.lower = tmp / "lower"
        self.upper = tmp / "upper"
        self.lower.mkdir()
        self.upper.mkdir()
        self.overlays: list[Overlay] = []

    def mount(self, *, device_whiteouts: bool = True) -> Overlay:
        """A fresh model over the layers, as after a remount."""
        for ov in self.overlays:
            ov.close()
        self.overlays = [Overlay(open_stack(LayerPaths((self.lower,), self.upper)))]
        ov = self.overlays[0]
        if not device_whiteouts:  # the fallback of uppers without RENAME_WHITEOUT
            ov.stack.work.features = type(ov.stack.work.features)(False, False)
        return ov

    def close(self) -> None:
        for ov in self.overlays:
            ov.close()


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[Layers]:
    found = Layers(tmp_path)
    yield found
    found.close()


def lookup(ov: Overlay, path: str) -> Inode:
    node = ov.table.root
    for part in filter(None, path.split("/")):
        found = ov.lookup(node, part)
        assert found is not None, path
        node = found
    return node


def visible(ov: Overlay, path: str) -> set[str]:
    directory = lookup(ov, path)
    names = ov.opendir(directory).snapshot(0, ov.listing)[2:]
    return {n for n in names if ov.lookup(directory, n) is not None}


def nlink(ov: Overlay, path: str) -> int:
    inode = lookup(ov, path)
    return ov.attributes(inode).nlink


def test_link_counts_of_an_indexed_hard_link_set_survive_concurrent_links_and_unlinks(
        layers: Layers) -> None:
    (layers.lower / "f").write_text("data")
    os.link(layers.lower / "f", layers.lower / "g")
    for d in ("d1", "d2"):
        (layers.lower / d).mkdir()
    ov = layers.mount()
    inode = lookup(ov, "f")
    ov.copy_up.ensure(inode)  # into the index
    dirs = lookup(ov, "d1"), lookup(ov, "d2")

    def hammer(directory: Inode, prefix: str) -> Callable[[], None]:
        def run() -> None:
            for i in range(ROUNDS):
                ov.link(inode, directory, f"{prefix}{i}")
                if i % 3:
                    ov.unlink(directory, f"{prefix}{i}")
        return run

    run_together(hammer(dirs[0], "x"), hammer(dirs[1], "y"))
    kept = 2 * len([i for i in range(ROUNDS) if not i % 3])
    assert nlink(ov, "f") == 2 + kept
    ov.unlink(lookup(ov, ""), "g")
    assert nlink(ov, "f") == 1 + kept
    ov = layers.mount()
    assert nlink(ov, "f") == 1 + kept
    assert nlink(ov, "d1/x0") == 1 + kept


@pytest.mark.parametrize("device_whiteouts", [True, False], ids=["device", "xattr"])
def test_removing_names_in_directories_while_they_are_renamed(layers: Layers,
                                                              device_whiteouts: bool) -> None:
    """The first whiteout in a directory marks it, its first rename records a redirect: both
    replace the directory's real layers, at the same moment in many directories."""
    dirs = [f"D{i}" for i in range(ROUNDS)]
    for d in dirs:
        (layers.lower / d).mkdir()
        for name in ("a", "b"):
            (layers.lower / d / name).write_text(name)
    ov = layers.mount(device_whiteouts=device_whiteouts)
    root = ov.table.root
    inodes = [lookup(ov, d) for d in dirs]

    def remove() -> None:
        for directory in inodes:
            ov.unlink(directory, "a")

    def rename() -> None:
        for d in dirs:
            ov.rename(root, d, root, "E" + d[1:], 0)

    run_together(remove, rename)
    for d in dirs:
        assert visible(ov, "E" + d[1:]) == {"b"}, d
    ov = layers.mount(device_whiteouts=device_whiteouts)
    for d in dirs:
        assert visible(ov, "E" + d[1:]) == {"b"}, f"{d} after a remount"


def test_names_added_while_copy_up_looks_for_one(layers: Layers) -> None:
    (layers.lower / "f").write_text("data")
    names = [f"n{i}" for i in range(200)]
    for name in names:
        os.link(layers.lower / "f", layers.lower / name)
    ov = layers.mount()
    root = ov.table.root
    inode = lookup(ov, "f")
    stop = threading.Event()

    def look_up() -> None:
        try:
            for _ in range(5):
                for name in names:
                    found = ov.lookup(root, name)
                    assert found is inode
                    ov.forget(found.number, 1)
        finally:
            stop.set()

    def find_names() -> None:
        while not stop.is_set():
            link = inode.any_link()
            assert link is not None
            assert link[0] is root

    run_together(look_up, find_names)


def test_a_metacopy_file_given_its_data_while_it_is_renamed_and_replaced(
        layers: Layers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 20, item 9 (data loss): a metacopy copy is given its data (opened for writing) while
    another request renames it away and creates a new file under its old name. The copy being
    filled must stay the renamed object; the new file must keep what was written to it. It was
    rebuilt in the work dir and renamed over its old name after the copy, without the namespace
    lock, which replaced the new file with the old data."""
    content = os.urandom(1 << 20)
    (layers.lower / "A").write_bytes(content)
    ov = Overlay(open_stack(LayerPaths((layers.lower,), layers.upper)), metacopy=True)
    layers.overlays.append(ov)
    root = ov.table.root
    inode = lookup(ov, "A")
    ov.setattr(inode, SetAttr(mode=0o600), None)  # a metadata-only copy
    assert inode.top.metacopy

    copy_data = realfs.copy_data
    raced: list[BaseException] = []

    def rename_and_replace() -> None:
        try:
            ov.rename(root, "A", root, "B", 0)
            handle = ov.create(root, "A", 0o644, ROOT)
            try:
                handle.write(0, b"important\n")
            finally:
                handle.close()
        except BaseException as e:
            raced.append(e)

    def copy_data_while_renamed(*args: object, **kwargs: object) -> None:
        # In the middle of giving the file its data: another thread renames and replaces it.
        worker = threading.Thread(target=rename_and_replace)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "rename during the fill hung"
        copy_data(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(realfs, "copy_data", copy_data_while_renamed)
    handle = ov.open(inode, os.O_RDWR)
    handle.close()
    monkeypatch.setattr(realfs, "copy_data", copy_data)
    assert not raced, raced

    assert read_all(ov, "A") == b"important\n"
    assert read_all(ov, "B") == content
    ov = layers.mount()  # a remount
    assert read_all(ov, "A") == b"important\n"
    assert read_all(ov, "B") == content
    assert not lookup(ov, "B").top.metacopy
    assert (layers.upper / "A").read_bytes() == b"important\n"
    assert (layers.upper / "B").read_bytes() == content
    assert (layers.lower / "A").read_bytes() == content


def read_all(ov: Overlay, path: str) -> bytes:
    handle = ov.open(lookup(ov, path), os.O_RDONLY)
    try:
        return handle.read(0, 1 << 24)
    finally:
        handle.close()
