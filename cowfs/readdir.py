"""Merged directory listings (the kernel's fs/overlayfs/readdir.c).

A listing is the union of the names in every layer of a directory, upper first, without duplicates.
Whether a name is really visible (and not whited out, or hidden below a non-directory) is decided
per entry by the same resolution as a lookup, since readdirplus must look every entry up anyway.

The listing is taken once per open directory (and again on rewind), and offsets index into that
snapshot, so they stay valid while the directory changes: ``rm -rf`` of a large merged directory,
and ``telldir``/``seekdir``, see every entry exactly once.

An entry whose lookup fails (a refused redirect) is still listed, without attributes, as the
kernel lists it; only using it fails. One bad entry never makes its directory unlistable.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Container, Iterable

from . import realfs
from .inodes import Inode


def merge_names(listings: Iterable[Iterable[str]], hidden: Container[str] = ()) -> list[str]:
    """The union of the layers' names, topmost layer's order first, each name once."""
    seen: dict[str, None] = {}
    for names in listings:
        for name in names:
            if name not in hidden:
                seen.setdefault(name, None)
    return list(seen)


def candidate_names(directory: Inode, hidden: Container[str]) -> list[str]:
    """Every name that may be visible in ``directory`` (whiteouts are filtered by the caller)."""
    return merge_names((realfs.list_names(real.fd) for real in directory.reals), hidden)


def entry_type(directory: Inode, name: str) -> tuple[int, int, int]:
    """The file type (``S_IFMT`` bits), layer index and inode number of the topmost real object
    named ``name`` (zeros if none): what a listing shows for an entry whose lookup fails (the
    kernel shows the real entry's type)."""
    for real in directory.reals:
        try:
            st = os.stat(name, dir_fd=real.fd, follow_symlinks=False)
        except OSError:
            continue
        return stat.S_IFMT(st.st_mode), real.layer.index, st.st_ino
    return 0, 0, 0


class DirHandle:
    """An open directory: a snapshot of candidate names, taken at the first read."""

    __slots__ = ("inode", "names")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.names: list[str] | None = None

    def snapshot(self, offset: int, hidden: Container[str]) -> list[str]:
        """The names to serve offsets into; offset 0 (a new read or a rewind) takes a fresh one."""
        if offset == 0 or self.names is None:
            self.names = [".", "..", *candidate_names(self.inode, hidden)]
        return self.names
