"""Merging adjacent frozen layers into one directory, with the overlay's rule (for ``cowfs layer
squash``).

The layers are applied bottom first onto an empty directory; each object of a higher layer:

- a whiteout removes what the directory holds at its name and stays a whiteout (it may hide
  something in the layers below the squashed ones);
- a non-directory replaces what is there;
- a directory over a directory merges with it (its mode, owner, times and xattrs win), unless it
  is opaque; an opaque directory, or a directory over a non-directory or a whiteout, replaces
  what is there and is opaque (``user.overlay.opaque=y``): the layers below must not show
  through it, as they did not before.

The result is a layer directory in cowfs's format, but not yet normalized: a whiteout or opaque
mark may hide nothing below. ``cowfs layer squash`` exports it against the layers below (the
walk leaves those out) and imports that tar, as a freeze does.

Frozen layers hold no redirects, metacopy files or origins (they were exported and imported), so
none are handled. Objects are reached from their parent's descriptor, never through a symlink.
Directories are made 0700 and get their modes and times last, deepest first, so that a plain
user can fill a directory whose mode has no write bit.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from ..core import realfs, schema
from . import plans
from .oci import make_whiteout

_IS_ROOT = os.geteuid() == 0


def _lstat(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _open(dirfd: int, name: str) -> int:
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)


def _is_whiteout(dirfd: int, name: str, st: os.stat_result) -> bool:
    if schema.is_device_whiteout(st.st_mode, st.st_rdev):
        return True
    if not schema.may_be_xattr_whiteout(st.st_mode, st.st_size):
        return False
    fd = _open(dirfd, name)
    try:
        return (realfs.getxattr(fd, schema.XATTR_WHITEOUT) is not None
                and realfs.getxattr(dirfd, schema.XATTR_OPAQUE) == schema.OPAQUE_HAS_XWHITEOUTS)
    finally:
        os.close(fd)


def _user_xattrs(fd: int) -> dict[str, bytes]:
    """The xattrs a user set (stored names, escaped ones included), not the layer's metadata."""
    found = {}
    for stored in realfs.listxattr(fd):
        if schema.unescape_xattr(stored) is None:
            continue
        value = realfs.getxattr(fd, stored)
        if value is not None:
            found[stored] = value
    return found


def _set_xattrs(fd: int, xattrs: dict[str, bytes], *, replace: bool) -> None:
    if replace:
        for stored in _user_xattrs(fd):
            if stored not in xattrs:
                realfs.removexattr(fd, stored)
    for stored, value in xattrs.items():
        try:
            realfs.setxattr(fd, stored, value)
        except OSError as e:
            if not stored.startswith("trusted.") or e.errno != errno.EPERM:
                raise


def _whiteout(dirfd: int, name: str) -> None:
    if not make_whiteout(dirfd, name) and realfs.getxattr(dirfd, schema.XATTR_OPAQUE) is None:
        realfs.setxattr(dirfd, schema.XATTR_OPAQUE, schema.OPAQUE_HAS_XWHITEOUTS)


class _Merger:
    def __init__(self, dest_fd: int) -> None:
        self.dest_fd = dest_fd
        #: Directories' mode, uid, gid and mtime_ns by path, set last.
        self.dirs: dict[str, tuple[int, int, int, int]] = {}
        #: A layer's inodes already copied, to the path of their copy (hard links).
        self.copied: dict[tuple[int, int], str] = {}
        self.root: tuple[int, int, int, int] | None = None

    def apply(self, layer: Path) -> None:
        self.copied = {}
        src_root = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            # The root's attributes are the topmost layer's, as for any merged directory.
            st = os.fstat(src_root)
            self.root = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
            todo = [""]
            while todo:
                path = todo.pop()
                todo.extend(self._directory(src_root, path))
        finally:
            os.close(src_root)

    def _dir_fds(self, src_root: int, path: str) -> tuple[int, int]:
        if not path:
            return (os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=src_root),
                    os.dup(self.dest_fd))
        fds = []
        for root in (src_root, self.dest_fd):
            with plans.parent_of(root, path) as (parent, name):
                fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                   | os.O_CLOEXEC, dir_fd=parent))
        return fds[0], fds[1]

    def _directory(self, src_root: int, path: str) -> list[str]:
        """Apply one directory's entries; returns the subdirectories to apply next."""
        src, dst = self._dir_fds(src_root, path)
        todo = []
        try:
            for name in sorted(os.listdir(src), key=os.fsencode):
                if not path and name == schema.WORK_DIR_NAME:
                    continue
                child = f"{path}/{name}" if path else name
                st = os.stat(name, dir_fd=src, follow_symlinks=False)
                there = _lstat(dst, name)
                if _is_whiteout(src, name, st):
                    if there is not None:
                        realfs.remove_tree(dst, name)
                    _whiteout(dst, name)
                elif stat.S_ISDIR(st.st_mode):
                    if self._dir(src, dst, name, child, st, there):
                        todo.append(child)
                else:
                    if there is not None:
                        realfs.remove_tree(dst, name)
                    self._nondir(src, dst, name, child, st)
        finally:
            os.close(src)
            os.close(dst)
        return todo

    def _dir(self, src: int, dst: int, name: str, path: str, st: os.stat_result,
             there: os.stat_result | None) -> bool:
        fd = _open(src, name)
        try:
            opaque = realfs.getxattr(fd, schema.XATTR_OPAQUE)
            xattrs = _user_xattrs(fd)
        finally:
            os.close(fd)
        merge = there is not None and stat.S_ISDIR(there.st_mode) and opaque != schema.OPAQUE_YES
        if not merge:
            if there is not None:
                realfs.remove_tree(dst, name)
            realfs.mkdir(dst, name, 0o700)
        out = _open(dst, name)
        try:
            _set_xattrs(out, xattrs, replace=merge)
            if not merge and (opaque == schema.OPAQUE_YES or there is not None):
                realfs.setxattr(out, schema.XATTR_OPAQUE, schema.OPAQUE_YES)
            elif opaque == schema.OPAQUE_HAS_XWHITEOUTS and realfs.getxattr(
                    out, schema.XATTR_OPAQUE) is None:
                realfs.setxattr(out, schema.XATTR_OPAQUE, schema.OPAQUE_HAS_XWHITEOUTS)
        finally:
            os.close(out)
        self.dirs[path] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)
        return True

    def _nondir(self, src: int, dst: int, name: str, path: str, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in self.copied:
            with plans.parent_of(self.dest_fd, self.copied[key]) as (tdir, tname):
                os.link(tname, name, src_dir_fd=tdir, dst_dir_fd=dst, follow_symlinks=False)
            return
        kind = stat.S_IFMT(st.st_mode)
        fd = _open(src, name)
        try:
            if kind == stat.S_IFREG:
                data = realfs.reopen(fd, os.O_RDONLY)
                out = realfs.create_file(dst, name, 0o600, os.O_WRONLY)
                try:
                    realfs.copy_data(data, out, st.st_size)
                finally:
                    os.close(data)
                    os.close(out)
            elif kind == stat.S_IFLNK:
                realfs.symlink(dst, name, realfs.readlink(fd))
            else:
                realfs.mknod(dst, name, kind | 0o600, st.st_rdev)
            xattrs = _user_xattrs(fd) if kind != stat.S_IFLNK else {}
        finally:
            os.close(fd)
        out = _open(dst, name)
        try:
            _set_xattrs(out, xattrs, replace=False)
            if _IS_ROOT:
                realfs.chown(out, st.st_uid, st.st_gid)
            if kind != stat.S_IFLNK:
                realfs.chmod(out, stat.S_IMODE(st.st_mode))
            realfs.utimens(out, st.st_atime_ns, st.st_mtime_ns)
        finally:
            os.close(out)
        if kind != stat.S_IFDIR:
            self.copied[key] = path

    def finish(self) -> None:
        """Directories' owners, modes and times, deepest first (a mode without a write bit
        after the last entry is made; a time after the last change inside)."""
        for path in sorted(self.dirs, key=lambda p: -p.count("/")):
            mode, uid, gid, mtime_ns = self.dirs[path]
            try:
                with plans.parent_of(self.dest_fd, path) as (parent, name):
                    fd = _open(parent, name)
            except (FileNotFoundError, NotADirectoryError):
                continue  # replaced by a higher layer's non-directory, or inside one
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    if _IS_ROOT:
                        realfs.chown(fd, uid, gid)
                    realfs.chmod(fd, mode)
                    realfs.utimens(fd, mtime_ns, mtime_ns)
            finally:
                os.close(fd)
        if self.root is not None:
            mode, uid, gid, mtime_ns = self.root
            if _IS_ROOT:
                realfs.chown(self.dest_fd, uid, gid)
            realfs.chmod(self.dest_fd, mode)
            realfs.utimens(self.dest_fd, mtime_ns, mtime_ns)


def merge_layers(layers: Sequence[Path], dest: Path) -> None:
    """Merge ``layers`` (topmost first) into ``dest``, a new directory."""
    dest.mkdir(mode=0o700)
    dest_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        merger = _Merger(dest_fd)
        for layer in reversed(layers):
            merger.apply(layer)
        merger.finish()
    finally:
        os.close(dest_fd)
