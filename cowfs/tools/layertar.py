"""The canonical OCI layer tar of a frozen layer directory, whose sha256 is the layer's diff_id
(``cowfs export STACK/layers/HEX``; docs/layer-format.md, section 17).

Why a writer of its own rather than ``cowfs export``'s: export walks an upper against its lowers
(a record at a time, markers where the walk finds changes), so its bytes depend on the layers
below; a frozen layer's name must depend on its own content only. Members: depth-first, names
sorted bytewise, each directory before what it holds, no root member; a whiteout as an empty
``.wh.NAME``, an opaque directory followed by ``.wh..wh..opq``; mtimes in whole seconds
(clamped to ``SOURCE_DATE_EPOCH``), numeric owners without names, user xattrs sorted as
``SCHILY.xattr.*``; hard links to the first name; sockets left out.

Known limit: one descriptor is open per directory level (a layer deeper than the descriptor
limit fails with EMFILE).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import IO

from ..core import realfs, schema
from .oci import tar_mtime
from .walk import visible_xattrs


def _is_whiteout(fd: int, st: os.stat_result, parent_fd: int) -> bool:
    if schema.is_device_whiteout(st.st_mode, st.st_rdev):
        return True
    if not schema.may_be_xattr_whiteout(st.st_mode, st.st_size):
        return False
    return (realfs.getxattr(fd, schema.XATTR_WHITEOUT) is not None
            and realfs.getxattr(parent_fd, schema.XATTR_OPAQUE) == schema.OPAQUE_HAS_XWHITEOUTS)


class _LayerTar:
    """Writes a frozen layer directory as its canonical OCI layer tar."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.inodes: dict[tuple[int, int], str] = {}

    def _info(self, path: str, kind: bytes) -> tarfile.TarInfo:
        info = tarfile.TarInfo("./" + path)
        info.type = kind
        info.uname = info.gname = ""
        return info

    def marker(self, path: str) -> None:
        info = self._info(path, tarfile.REGTYPE)
        info.mode = 0o644
        self.tar.addfile(info)

    def entry(self, path: str, fd: int, st: os.stat_result) -> None:
        kind = stat.S_IFMT(st.st_mode)
        types = {stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE,
                 stat.S_IFLNK: tarfile.SYMTYPE, stat.S_IFIFO: tarfile.FIFOTYPE,
                 stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE}
        if kind not in types:
            return  # a socket: tar cannot hold one (cowfs export skips it too)
        info = self._info(path, types[kind])
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.mtime = tar_mtime(st)
        if kind == stat.S_IFLNK:
            info.linkname = realfs.readlink(fd)
        else:
            info.pax_headers = {"SCHILY.xattr." + n: v.decode("utf-8", "surrogateescape")
                                for n, v in sorted(visible_xattrs(fd).items())}
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        key = (st.st_dev, st.st_ino)
        if kind != stat.S_IFDIR and key in self.inodes:
            info.type = tarfile.LNKTYPE
            info.linkname = "./" + self.inodes[key]
            self.tar.addfile(info)
            return
        if kind != stat.S_IFDIR:
            self.inodes[key] = path
        if kind == stat.S_IFREG:
            info.size = st.st_size
            with os.fdopen(realfs.reopen(fd, os.O_RDONLY), "rb") as data:
                self.tar.addfile(info, data)
        else:
            self.tar.addfile(info)


def _names(dirfd: int) -> list[str]:
    return sorted(os.listdir(dirfd), key=os.fsencode)


def write_layer_tar(layer: Path, out: IO[bytes]) -> None:
    """``layer`` (a frozen layer directory) as its canonical OCI layer tar, to ``out``: whiteouts
    as ``.wh.NAME``, opaque directories with ``.wh..wh..opq`` first, hard links to the first
    name, no root member. Every object is reached from its parent's descriptor, no symlink is
    followed."""
    root = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        writer = _LayerTar(tar)
        # Depth-first without recursion: (directory fd, its path, its names still to visit).
        todo: list[tuple[int, str, list[str]]] = [(root, "", _names(root)[::-1])]
        try:
            while todo:
                dirfd, prefix, names = todo[-1]
                if not names:
                    os.close(dirfd)
                    todo.pop()
                    continue
                name = names.pop()
                if not prefix and name == schema.WORK_DIR_NAME:
                    continue
                path = prefix + name
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                try:
                    st = os.fstat(fd)
                    if _is_whiteout(fd, st, dirfd):
                        parent, _, base = path.rpartition("/")
                        writer.marker(f"{parent}/.wh.{base}" if parent else f".wh.{base}")
                        continue
                    writer.entry(path, fd, st)
                    if stat.S_ISDIR(st.st_mode):
                        if realfs.getxattr(fd, schema.XATTR_OPAQUE) == schema.OPAQUE_YES:
                            writer.marker(f"{path}/.wh..wh..opq")
                        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                        | os.O_CLOEXEC, dir_fd=dirfd)
                        todo.append((child, path + "/", _names(child)[::-1]))
                finally:
                    os.close(fd)
        finally:
            for dirfd, _, _ in todo:
                os.close(dirfd)


class _Hashing(io.RawIOBase):
    """A sink that only hashes (and counts) what is written."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def layer_digest(layer: Path) -> str:
    """The hex sha256 of :func:`write_layer_tar` of ``layer``."""
    sink = _Hashing()
    write_layer_tar(layer, sink)  # type: ignore[arg-type]
    return sink.sha.hexdigest()
