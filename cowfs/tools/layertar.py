"""The canonical OCI layer tar, whose sha256 is a layer's diff_id (docs/layer-format.md, section
17), and its one writer, for both of its sources:

- a frozen layer directory (:func:`write_layer_tar`: ``cowfs export STACK/layers/HEX``, the
  name of a layer in its stack, and ``cowfs image export`` of a frozen layer);
- a layer tar that ``cowfs export`` wrote of an upper against its lowers
  (:func:`write_canonical`: ``cowfs image export`` of a live upper or of a plain directory).

Freezing an upper imports the tar ``cowfs export`` writes of it, and the frozen layer is then
written from its directory; both go through :class:`_Writer`, in one order, so that the same
content gives the same bytes whichever way it came: an upper exported live and the same upper
frozen have the same diff_id.

The form: PAX; members in :func:`canonical_key` order (depth-first, names sorted bytewise,
each directory before what it holds, a whiteout ``.wh.NAME`` where NAME would be, an opaque
directory's ``.wh..wh..opq`` right after it); no member for the layer root (what an import
makes of the root is not the layer's: its time would be the import's); names ``./PATH``; mtimes
in whole seconds (clamped to ``SOURCE_DATE_EPOCH`` by whoever read them: :func:`oci.tar_mtime`),
numeric owners without names, user xattrs sorted as ``SCHILY.xattr.*`` and no other PAX record
of the source's; of an inode's names the first in that order holds the data and the others are
hard links to it; sockets left out; markers (whiteouts, opaque) empty, mode 0644, owner 0,
time 0.

Known limits: :func:`write_layer_tar` keeps one descriptor open per directory level (a layer
deeper than the descriptor limit fails with EMFILE); :func:`write_canonical` holds the source's
member list in memory (as ``tarfile`` does).
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
from .oci import OPAQUE_MARKER, WHITEOUT_PREFIX, XATTR_PAX_PREFIX, tar_mtime
from .walk import visible_xattrs

_TYPES = {stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE,
          stat.S_IFLNK: tarfile.SYMTYPE, stat.S_IFIFO: tarfile.FIFOTYPE,
          stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE}


def canonical_key(path: str) -> list[bytes]:
    """Where ``path`` (without ``./``) goes in a canonical tar: by its components as bytes, a
    whiteout ``.wh.NAME`` as NAME, an opaque marker as an empty name (first in its directory).
    Sorting by it is the depth-first walk with sorted names of :func:`write_layer_tar`."""
    parts = [os.fsencode(part) for part in path.split("/")]
    last = parts[-1]
    if last == OPAQUE_MARKER.encode():
        parts[-1] = b""
    elif last.startswith(WHITEOUT_PREFIX.encode()):
        parts[-1] = last[len(WHITEOUT_PREFIX):]
    return parts


class _Writer:
    """The one place a canonical member's header is made."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar

    def marker(self, path: str) -> None:
        """An empty regular file: a whiteout or an opaque marker."""
        info = tarfile.TarInfo("./" + path)
        info.mode = 0o644
        info.uname = info.gname = ""
        self.tar.addfile(info)

    def member(self, path: str, kind: bytes, *, mode: int, uid: int, gid: int, mtime: int,
               xattrs: dict[str, str], linkname: str = "", device: tuple[int, int] = (0, 0),
               link_to: str | None = None, size: int = 0,
               data: IO[bytes] | None = None) -> None:
        """One object: ``kind`` a tarfile type; ``xattrs`` by the names users see, as PAX
        text; ``link_to``: an earlier name of the same inode (the member is a hard link to it,
        without data)."""
        info = tarfile.TarInfo("./" + path)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.mtime = mtime
        info.pax_headers = {XATTR_PAX_PREFIX + name: value
                            for name, value in sorted(xattrs.items())}
        if kind == tarfile.SYMTYPE:
            info.linkname = linkname
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = device
        if link_to is not None:
            info.type, info.linkname = tarfile.LNKTYPE, "./" + link_to
            self.tar.addfile(info)
        elif kind == tarfile.REGTYPE:
            info.size = size
            self.tar.addfile(info, data)
        else:
            self.tar.addfile(info)


def _open_tar(out: IO[bytes]) -> tarfile.TarFile:
    return tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)


# --- from a layer directory ----------------------------------------------------------------------


def _is_whiteout(fd: int, st: os.stat_result, parent_fd: int) -> bool:
    if schema.is_device_whiteout(st.st_mode, st.st_rdev):
        return True
    if not schema.may_be_xattr_whiteout(st.st_mode, st.st_size):
        return False
    return (realfs.getxattr(fd, schema.XATTR_WHITEOUT) is not None
            and realfs.getxattr(parent_fd, schema.XATTR_OPAQUE) == schema.OPAQUE_HAS_XWHITEOUTS)


def _add_object(writer: _Writer, inodes: dict[tuple[int, int], str], path: str, fd: int,
                st: os.stat_result) -> None:
    kind = stat.S_IFMT(st.st_mode)
    if kind not in _TYPES:
        return  # a socket: tar cannot hold one (cowfs export skips it too)
    key = (st.st_dev, st.st_ino)
    link_to = inodes.get(key) if kind != stat.S_IFDIR else None
    if kind != stat.S_IFDIR and link_to is None:
        inodes[key] = path
    xattrs = {} if kind == stat.S_IFLNK else {
        name: value.decode("utf-8", "surrogateescape")
        for name, value in visible_xattrs(fd).items()}
    data = os.fdopen(realfs.reopen(fd, os.O_RDONLY), "rb") \
        if kind == stat.S_IFREG and link_to is None else None
    try:
        writer.member(path, _TYPES[kind], mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                      gid=st.st_gid, mtime=tar_mtime(st), xattrs=xattrs,
                      linkname=realfs.readlink(fd) if kind == stat.S_IFLNK else "",
                      device=(os.major(st.st_rdev), os.minor(st.st_rdev)), link_to=link_to,
                      size=st.st_size, data=data)
    finally:
        if data is not None:
            data.close()


def _names(dirfd: int) -> list[str]:
    return sorted(os.listdir(dirfd), key=os.fsencode)


def write_layer_tar(layer: Path, out: IO[bytes]) -> None:
    """``layer`` (a frozen layer directory) as its canonical OCI layer tar, to ``out``. Every
    object is reached from its parent's descriptor, no symlink is followed."""
    root = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with _open_tar(out) as tar:
        writer = _Writer(tar)
        inodes: dict[tuple[int, int], str] = {}
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
                        writer.marker(prefix + WHITEOUT_PREFIX + name)
                        continue
                    _add_object(writer, inodes, path, fd, st)
                    if stat.S_ISDIR(st.st_mode):
                        if realfs.getxattr(fd, schema.XATTR_OPAQUE) == schema.OPAQUE_YES:
                            writer.marker(f"{path}/{OPAQUE_MARKER}")
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


# --- from a layer tar ----------------------------------------------------------------------------


def _name(member: str) -> str:
    while member.startswith("./"):
        member = member[2:]
    return member.rstrip("/") or "."


def write_canonical(source: IO[bytes], out: IO[bytes]) -> None:
    """The layer tar ``source`` (one ``cowfs export`` wrote) rewritten to ``out`` in canonical
    form: the members sorted, a name given twice counted once (the last), the root member left
    out, of a file's hard links the first name in canonical order holding the data."""
    with tarfile.open(fileobj=source, mode="r:") as tar, _open_tar(out) as dest:
        writer = _Writer(tar=dest)
        members: dict[str, tarfile.TarInfo] = {}
        for member in tar.getmembers():
            name = _name(member.name)
            if name == "." or (member.islnk() and _name(member.linkname) == name):
                continue  # the root; a file written twice is a "link" to itself the second time
            members[name] = member
        # Hard links: every name of one file, by the name that holds its data.
        names_of: dict[str, list[str]] = {}
        for name, member in members.items():
            if member.islnk():
                names_of.setdefault(_name(member.linkname), []).append(name)
        first_of: dict[str, str] = {}
        for holder, links in names_of.items():
            first = min([holder, *links], key=canonical_key)
            for name in (holder, *links):
                first_of[name] = first
        for name in sorted(members, key=canonical_key):
            member = members[name]
            base = name.rpartition("/")[2]
            if base.startswith(WHITEOUT_PREFIX):
                writer.marker(name)
                continue
            data_member = members.get(_name(member.linkname), member) if member.islnk() \
                else member
            linked_to = first_of.get(name)
            kind = tarfile.REGTYPE if data_member.islnk() else data_member.type
            writer.member(
                name, kind, mode=data_member.mode, uid=data_member.uid, gid=data_member.gid,
                mtime=int(data_member.mtime), linkname=data_member.linkname,
                device=(data_member.devmajor, data_member.devminor),
                xattrs={key.removeprefix(XATTR_PAX_PREFIX): value
                        for key, value in data_member.pax_headers.items()
                        if key.startswith(XATTR_PAX_PREFIX)},
                link_to=linked_to if linked_to != name else None,
                size=data_member.size,
                data=tar.extractfile(data_member) if data_member.isreg() else None)
