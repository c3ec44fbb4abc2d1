"""Where a metacopy file finds its data (:func:`cowfs.core.metacopy.find_data`), without a mount:
the origin's layer counts from the marked file's own layer, other layers below it are a fallback,
and the rules (regular file, inode, size, no chain, owner) hold at every layer looked at."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cowfs.core import metacopy
from cowfs.core.layers import Layer, holds_metacopy
from cowfs.core.resolve import Real, root_real

MARK = "user.overlay.metacopy"
ORIGIN = "user.cowfs.origin"


def test_data_layers_count_from_the_marked_files_layer() -> None:
    # An upper's metacopy file: only the layer its origin names.
    assert metacopy.data_layers(0, 1, 3) == [1]
    assert metacopy.data_layers(0, 3, 3) == []
    # A lower's (layer 1 of 4): origin layer 1 is layer 2 here; then the others below it.
    assert metacopy.data_layers(1, 1, 4) == [2, 3]
    assert metacopy.data_layers(1, 2, 4) == [3, 2]
    # The stack below it is shorter than the one it was written over: the others only.
    assert metacopy.data_layers(2, 5, 4) == [3]
    # Never its own layer or one above it.
    assert all(i > 2 for i in metacopy.data_layers(2, 1, 6))


class Stack:
    """Layer directories under ``tmp``, opened as a mount opens them (index 0 is the upper)."""

    def __init__(self, dirs: list[Path]) -> None:
        self.fds = [os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for d in dirs]
        self.layers = [Layer(i, d, fd, os.fstat(fd).st_dev, is_bottom=i == len(dirs) - 1,
                             cowfs_upper=i > 0 and holds_metacopy(fd))
                       for i, (d, fd) in enumerate(zip(dirs, self.fds, strict=True))]
        self.roots = tuple(root_real(layer) for layer in self.layers)

    def close(self) -> None:
        for fd in (*self.fds, *(r.fd for r in self.roots)):
            os.close(fd)

    def find(self, index: int, rel: str) -> Real:
        fd = os.open(self.layers[index].path / rel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return metacopy.find_data(fd, self.roots, os.getuid(), layer_index=index)
        finally:
            os.close(fd)


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    """OLD, a cowfs upper written over BASE, holds ``f`` marked, whose data is BASE's ``f``."""
    found = {name: tmp_path / name for name in ("upper", "old", "extra", "base")}
    for d in found.values():
        d.mkdir()
    (found["base"] / "f").write_bytes(b"base data")
    (found["extra"] / "f").write_bytes(b"extra dat")  # same size, another inode
    marked = found["old"] / "f"
    marked.write_bytes(bytes(9))
    os.setxattr(found["old"], "user.cowfs.format", b"1")
    os.setxattr(marked, MARK, b"")
    os.setxattr(marked, ORIGIN, f"1:{os.stat(found['base'] / 'f').st_ino}:/f".encode())
    return found


def read(real: Real) -> bytes:
    try:
        return Path(f"/proc/self/fd/{real.fd}").read_bytes()
    finally:
        os.close(real.fd)


def test_the_origin_layer_counts_from_the_marked_files_layer(dirs: dict[str, Path]) -> None:
    stack = Stack([dirs["upper"], dirs["old"], dirs["base"]])
    try:
        assert read(stack.find(1, "f")) == b"base data"
    finally:
        stack.close()


def test_a_layer_inserted_below_is_passed_over(dirs: dict[str, Path]) -> None:
    """Layer 1 + 1 is EXTRA now, whose ``f`` is another inode: BASE, further down, has it."""
    stack = Stack([dirs["upper"], dirs["old"], dirs["extra"], dirs["base"]])
    try:
        assert read(stack.find(1, "f")) == b"base data"
    finally:
        stack.close()


@pytest.mark.parametrize("flaw", ["size", "inode", "chain", "no layer below"])
def test_no_layer_passes(dirs: dict[str, Path], flaw: str) -> None:
    order = [dirs["upper"], dirs["old"], dirs["base"]]
    if flaw == "size":
        (dirs["base"] / "f").write_bytes(b"base data, longer")
    elif flaw == "inode":
        os.setxattr(dirs["old"] / "f", ORIGIN, b"1:12345:/f")
    elif flaw == "chain":
        os.setxattr(dirs["base"], "user.cowfs.format", b"1")
        os.setxattr(dirs["base"] / "f", MARK, b"")
    else:
        order = [dirs["upper"], dirs["base"], dirs["old"]]  # OLD at the bottom
    stack = Stack(order)
    try:
        with pytest.raises(metacopy.NoDataError):
            stack.find(order.index(dirs["old"]), "f")
    finally:
        stack.close()
