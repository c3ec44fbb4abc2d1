"""Changes to the merged namespace (the kernel's fs/overlayfs/dir.c).

Creating, removing and renaming names: every change lands in the upper layer, and a name that still
exists in a lower layer is hidden by a whiteout. Multi-step changes are built in the work directory
and swapped into place, so that no intermediate state is ever visible:

* a new object over a whiteout is built in the work dir and renamed over it (a directory is
  exchanged with it, since rename cannot replace a file by a directory), and is made opaque;
* a whiteout is built in the work dir (an empty file with ``user.overlay.whiteout``) and renamed
  into place, after its parent has been marked ``user.overlay.opaque=x``;
* a directory that is removed is first swapped out into the work dir, then deleted there.

A directory that has lower content is renamed by copying up the directory alone and recording its
lower location in ``user.overlay.redirect`` (the kernel's ``redirect_dir=on``), in O(1).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from . import realfs, schema
from .copyup import CopyUp, adjust_nlink
from .inodes import Inode, InodeTable
from .layers import LayerStack
from .readdir import candidate_names
from .resolve import Found, Real, exists_below, is_hidden_name, probe, read_dir_mark, resolve

log = logging.getLogger(__name__)

NAME_MAX = 255


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asked: new objects belong to the caller and respect its umask."""

    uid: int
    gid: int
    umask: int


class Slot(Enum):
    """What the upper layer holds at a name."""

    EMPTY = "empty"
    WHITEOUT = "whiteout"
    OBJECT = "object"


def check_name(name: str) -> None:
    if len(os.fsencode(name)) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, "file name too long", name)
    if "/" in name or name in ("", ".", ".."):
        raise OSError(errno.EINVAL, "invalid name", name)


def close_reals(reals: tuple[Real, ...]) -> None:
    for real in reals:
        os.close(real.fd)


class Namespace:
    """The namespace operations of one mount."""

    def __init__(self, stack: LayerStack, table: InodeTable, copy_up: CopyUp) -> None:
        self.stack = stack
        self.table = table
        self.copy_up = copy_up
        self.work = copy_up.work

    # --- looking names up ---------------------------------------------------------------------

    def resolve_child(self, parent: Inode, name: str) -> tuple[Real, ...]:
        """The real objects behind ``name`` (caller closes them); empty when it does not exist."""
        if is_hidden_name(parent is self.table.root, name):
            return ()
        return resolve(parent.child_parents, self.table.root.reals, name)

    def lookup(self, parent: Inode, name: str) -> Inode | None:
        """Look a name up, counting one kernel lookup on the inode found."""
        reals = self.resolve_child(parent, name)
        if not reals:
            return None
        return self.table.remember(self.copy_up.attach_index(reals), parent, name)

    def is_empty_dir(self, directory: Inode) -> bool:
        for name in candidate_names(directory, ()):
            reals = resolve(directory.child_parents, self.table.root.reals, name)
            close_reals(reals)
            if reals:
                return False
        return True

    # --- upper-layer primitives ---------------------------------------------------------------

    def _slot(self, parent_upper: Real, name: str) -> Slot:
        found = probe(parent_upper, name)
        if found is None:
            return Slot.EMPTY
        if isinstance(found, Found):
            os.close(found.obj.fd)
            return Slot.OBJECT
        return Slot.WHITEOUT

    def _mark_xwhiteouts(self, directory: Inode) -> Real:
        """Mark a directory's upper as holding xattr whiteouts, before the first one is placed."""
        upper = self.copy_up.ensure(directory)
        if upper.mark is schema.DirMark.PLAIN:
            realfs.setxattr(upper.fd, schema.XATTR_OPAQUE, schema.OPAQUE_HAS_XWHITEOUTS)
            upper = dataclasses.replace(upper, mark=schema.DirMark.XWHITEOUTS)
            directory.reals = (upper, *directory.reals[1:])
        return upper

    def _new_whiteout(self) -> str:
        temp = self.work.temp_name()
        fd = realfs.create_file(self.work.fd, temp, 0, os.O_WRONLY)
        try:
            os.setxattr(fd, schema.XATTR_WHITEOUT, b"")
        finally:
            os.close(fd)
        return temp

    def _place_whiteout(self, parent: Inode, name: str, over: Slot) -> None:
        """Hide ``name`` of the lower layers; ``over`` is what the upper holds there now."""
        parent_upper = self._mark_xwhiteouts(parent)
        temp = self._new_whiteout()
        if over is Slot.EMPTY:
            realfs.rename(self.work.fd, temp, parent_upper.fd, name, realfs.RENAME_NOREPLACE)
        else:
            realfs.rename(self.work.fd, temp, parent_upper.fd, name, realfs.RENAME_EXCHANGE)
            realfs.remove_tree(self.work.fd, temp)

    def _remove_upper(self, parent_upper: Real, name: str) -> None:
        """Delete an upper object; a directory (maybe holding whiteouts) goes via the work dir."""
        try:
            realfs.unlink(parent_upper.fd, name)
            return
        except IsADirectoryError:
            pass
        try:
            realfs.rmdir(parent_upper.fd, name)
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            temp = self.work.temp_name()
            realfs.rename(parent_upper.fd, name, self.work.fd, temp, realfs.RENAME_NOREPLACE)
            realfs.remove_tree(self.work.fd, temp)

    def _clear(self, parent: Inode, name: str, slot: Slot) -> None:
        """Make ``name`` absent from the merged view: whiteout if a lower has it, else delete."""
        if exists_below(parent.child_parents, name):
            self._place_whiteout(parent, name, slot)
        elif slot is not Slot.EMPTY:
            parent_upper = parent.upper
            assert parent_upper is not None, "an upper object implies an upper parent"
            self._remove_upper(parent_upper, name)

    # --- creating -----------------------------------------------------------------------------

    def _owner(self, parent: Inode, caller: Caller) -> tuple[int, int]:
        """The owner of a new object: the caller, with the group of a set-group-ID directory."""
        st = parent.top.stat()
        gid = st.st_gid if st.st_mode & stat.S_ISGID else caller.gid
        return caller.uid, gid

    def _new_object(self, parent: Inode, name: str, owner: tuple[int, int] | None, mode: int,
                    make: Callable[[int, str], None]) -> Inode:
        """Create an object with ``make(dirfd, name)``, owned by ``owner`` unless None."""
        check_name(name)
        if is_hidden_name(parent is self.table.root, name):
            raise OSError(errno.EPERM, "name reserved for the work directory", name)
        parent_upper = self.copy_up.ensure(parent)
        slot = self._slot(parent_upper, name)
        if slot is Slot.OBJECT:
            raise OSError(errno.EEXIST, "file exists", name)
        if slot is Slot.EMPTY:
            make(parent_upper.fd, name)
            fd = self._finish_new(parent_upper.fd, name, owner, mode)
        else:
            temp = self.work.temp_name()
            make(self.work.fd, temp)
            fd = self._finish_new(self.work.fd, temp, owner, mode)
            if stat.S_ISDIR(mode):
                realfs.setxattr(fd, schema.XATTR_OPAQUE, schema.OPAQUE_YES)
                realfs.rename(self.work.fd, temp, parent_upper.fd, name, realfs.RENAME_EXCHANGE)
                realfs.remove_tree(self.work.fd, temp)
            else:
                realfs.rename(self.work.fd, temp, parent_upper.fd, name)
        st = os.fstat(fd)
        mark = read_dir_mark(fd, self.stack.upper) if stat.S_ISDIR(st.st_mode) else (
            schema.DirMark.PLAIN)
        return self.table.remember((Real(self.stack.upper, fd, st.st_mode, mark),), parent, name)

    def _finish_new(self, dirfd: int, name: str, owner: tuple[int, int] | None, mode: int) -> int:
        fd = realfs.open_path(dirfd, name)
        assert fd is not None, "just created"
        if owner is not None and owner != (0, 0):  # cowfs runs as root: (0, 0) it is already
            realfs.chown(fd, *owner)
        if mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(mode) and owner is not None:
            # chown clears the set-ID bits, and mkdir ignores them (it inherits S_ISGID from
            # its parent, which a directory built in the work directory does not have).
            realfs.chmod(fd, stat.S_IMODE(mode))
        return fd

    def create(self, parent: Inode, name: str, mode: int, caller: Caller) -> tuple[Inode, int]:
        """Create a regular file; return it and a descriptor open for reading and writing."""
        mode = stat.S_IFREG | (stat.S_IMODE(mode) & ~caller.umask)
        opened: list[int] = []

        def make(dirfd: int, fname: str) -> None:
            opened.append(realfs.create_file(dirfd, fname, stat.S_IMODE(mode)))

        try:
            inode = self._new_object(parent, name, self._owner(parent, caller), mode, make)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        return inode, opened[0]

    def mkdir(self, parent: Inode, name: str, mode: int, caller: Caller) -> Inode:
        mode = stat.S_IFDIR | (stat.S_IMODE(mode) & ~caller.umask)
        if parent.top.stat().st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID  # inherited, as the kernel does for directories
        return self._new_object(parent, name, self._owner(parent, caller), mode,
                                lambda d, n: realfs.mkdir(d, n, stat.S_IMODE(mode)))

    def mknod(self, parent: Inode, name: str, mode: int, rdev: int, caller: Caller) -> Inode:
        if schema.is_device_whiteout(mode, rdev):
            # It would read back as a whiteout and vanish; the kernel refuses it too.
            raise OSError(errno.EPERM, "a 0/0 character device is a whiteout", name)
        mode = stat.S_IFMT(mode) | (stat.S_IMODE(mode) & ~caller.umask)
        return self._new_object(parent, name, self._owner(parent, caller), mode,
                                lambda d, n: realfs.mknod(d, n, mode, rdev))

    def symlink(self, parent: Inode, name: str, target: str, caller: Caller) -> Inode:
        return self._new_object(parent, name, self._owner(parent, caller), stat.S_IFLNK | 0o777,
                                lambda d, n: realfs.symlink(d, n, target))

    def link(self, inode: Inode, parent: Inode, name: str) -> Inode:
        if inode.is_dir:
            raise OSError(errno.EPERM, "hard links to directories are not allowed", name)
        upper = self.copy_up.ensure(inode)
        result = self._new_object(parent, name, None, upper.mode,
                                  lambda d, n: realfs.link(upper.fd, d, n))
        adjust_nlink(upper, +1)
        return result

    # --- removing -----------------------------------------------------------------------------

    def _child(self, parent: Inode, name: str) -> Inode:
        inode = self.lookup(parent, name)
        if inode is None:
            raise OSError(errno.ENOENT, "no such file or directory", name)
        return inode

    def unlink(self, parent: Inode, name: str) -> None:
        child = self._child(parent, name)
        try:
            if child.is_dir:
                raise OSError(errno.EISDIR, "is a directory", name)
            self._remove(parent, name, child)
        finally:
            self.table.forget(child.number, 1)

    def rmdir(self, parent: Inode, name: str) -> None:
        child = self._child(parent, name)
        try:
            if not child.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory", name)
            if not self.is_empty_dir(child):
                raise OSError(errno.ENOTEMPTY, "directory not empty", name)
            self._remove(parent, name, child)
        finally:
            self.table.forget(child.number, 1)

    def _remove(self, parent: Inode, name: str, child: Inode) -> None:
        parent_upper = self.copy_up.ensure(parent)
        self._drop_name(child)
        self._clear(parent, name, self._slot(parent_upper, name))
        child.drop_link(parent, name)

    def _drop_name(self, inode: Inode) -> None:
        """One name of ``inode`` is about to go: count it if it is a hard-linked lower object."""
        entry = self.copy_up.ensure_index(inode)
        if entry is not None:
            adjust_nlink(entry, -1)

    # --- renaming -----------------------------------------------------------------------------

    def rename(self, old_parent: Inode, old_name: str, new_parent: Inode, new_name: str,
               flags: int) -> None:
        if flags & ~(realfs.RENAME_NOREPLACE | realfs.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        check_name(new_name)
        if is_hidden_name(new_parent is self.table.root, new_name):
            raise OSError(errno.EPERM, "name reserved for the work directory", new_name)
        src = self._child(old_parent, old_name)
        dst = self.lookup(new_parent, new_name)
        try:
            self._rename(old_parent, old_name, src, new_parent, new_name, dst, flags)
        finally:
            self.table.forget(src.number, 1)
            if dst is not None:
                self.table.forget(dst.number, 1)

    def _check_rename(self, src: Inode, dst: Inode | None, flags: int, new_name: str) -> None:
        if flags & realfs.RENAME_EXCHANGE:
            if dst is None:
                raise OSError(errno.ENOENT, "no such file or directory", new_name)
            return
        if dst is None:
            return
        if flags & realfs.RENAME_NOREPLACE:
            raise OSError(errno.EEXIST, "file exists", new_name)
        if src.is_dir and not dst.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory", new_name)
        if dst.is_dir and not src.is_dir:
            raise OSError(errno.EISDIR, "is a directory", new_name)
        if dst.is_dir and not self.is_empty_dir(dst):
            raise OSError(errno.ENOTEMPTY, "directory not empty", new_name)

    def _movable_upper(self, inode: Inode) -> Real:
        """Copy the object up so that it can move; a directory with lower content is redirected.

        Only the directory itself is copied up, never its tree: its redirect tells later lookups
        where its lower content stays (O(1), where the kernel's default fails with EXDEV).
        """
        upper = self.copy_up.ensure(inode)
        if inode.is_dir and inode.lowers:
            return self._redirect(inode, upper)
        return upper

    def _named_upper(self, inode: Inode, parent: Inode, name: str) -> None:
        """Make sure ``name`` is in the upper: a hard-linked object copied up under another name
        is found through the index, and this name has no upper entry of its own yet."""
        if inode.is_dir:
            return
        parent_upper = self.copy_up.ensure(parent)
        upper = inode.upper
        if upper is not None and self._slot(parent_upper, name) is Slot.EMPTY:
            self.copy_up.link_name(upper, parent_upper, name)

    def _redirect(self, inode: Inode, upper: Real) -> Real:
        """Record the lower location of a directory about to move (absolute: parents may move)."""
        origin = self._lower_path(inode.lowers[0])
        if upper.redirect is not None and upper.redirect.components == origin:
            return upper
        realfs.setxattr(upper.fd, schema.XATTR_REDIRECT, schema.format_redirect(origin))
        upper = dataclasses.replace(upper, redirect=schema.Redirect(True, origin))
        inode.reals = (upper, *inode.reals[1:])
        return upper

    @staticmethod
    def _lower_path(real: Real) -> tuple[str, ...]:
        """Where a lower object sits below its layer's root (layers never change, so this is its
        permanent address)."""
        root = os.readlink(realfs.proc_path(real.layer.root_fd))
        path = os.readlink(realfs.proc_path(real.fd))
        if not path.startswith(root.rstrip("/") + "/"):
            raise OSError(errno.EIO, f"cannot locate {path!r} in lower layer {root!r}")
        return tuple(path[len(root.rstrip("/")) + 1:].split("/"))

    def _make_opaque_if_needed(self, inode: Inode, parent: Inode, name: str) -> None:
        """An upper-only directory moved over a name that lower layers have must not merge with
        them. (A redirected one merges only with its redirect target.)"""
        upper = inode.upper
        if upper is None or not inode.is_dir or upper.opaque or inode.lowers:
            return
        if exists_below(parent.child_parents, name):
            realfs.setxattr(upper.fd, schema.XATTR_OPAQUE, schema.OPAQUE_YES)
            inode.reals = (dataclasses.replace(upper, mark=schema.DirMark.OPAQUE),)

    def _rename(self, old_parent: Inode, old_name: str, src: Inode, new_parent: Inode,
                new_name: str, dst: Inode | None, flags: int) -> None:
        self._check_rename(src, dst, flags, new_name)
        if dst is src:
            return  # the same object under both names: POSIX says do nothing
        self._movable_upper(src)
        self._named_upper(src, old_parent, old_name)
        if dst is not None and flags & realfs.RENAME_EXCHANGE:
            self._movable_upper(dst)
            self._named_upper(dst, new_parent, new_name)
        elif dst is not None:
            self._drop_name(dst)
        old_upper = self.copy_up.ensure(old_parent)
        new_upper = self.copy_up.ensure(new_parent)
        self._make_opaque_if_needed(src, new_parent, new_name)
        if flags & realfs.RENAME_EXCHANGE:
            assert dst is not None
            self._make_opaque_if_needed(dst, old_parent, old_name)
            realfs.rename(old_upper.fd, old_name, new_upper.fd, new_name, realfs.RENAME_EXCHANGE)
            dst.drop_link(new_parent, new_name)
            dst.add_link(old_parent, old_name)
        else:
            self._move(old_parent, old_upper, old_name, new_upper, new_name, src.is_dir)
            if dst is not None:
                dst.drop_link(new_parent, new_name)
        src.drop_link(old_parent, old_name)
        src.add_link(new_parent, new_name)

    def _move(self, old_parent: Inode, old_upper: Real, old_name: str, new_upper: Real,
              new_name: str, is_dir: bool) -> None:
        """Move an upper object to a new name, then hide or clear what is left at the old one."""
        slot = self._slot(new_upper, new_name)
        if slot is Slot.EMPTY:
            realfs.rename(old_upper.fd, old_name, new_upper.fd, new_name,
                          realfs.RENAME_NOREPLACE)
            left = Slot.EMPTY
        elif not is_dir and not self._is_dir_at(new_upper, new_name):
            realfs.rename(old_upper.fd, old_name, new_upper.fd, new_name)
            left = Slot.EMPTY
        else:
            # Replace atomically: swap, then deal with what now sits at the old name.
            realfs.rename(old_upper.fd, old_name, new_upper.fd, new_name, realfs.RENAME_EXCHANGE)
            left = Slot.OBJECT
        if exists_below(old_parent.child_parents, old_name):
            self._place_whiteout(old_parent, old_name, left)
        elif left is Slot.OBJECT:
            self._remove_upper(old_upper, old_name)

    @staticmethod
    def _is_dir_at(parent_upper: Real, name: str) -> bool:
        st = os.stat(name, dir_fd=parent_upper.fd, follow_symlinks=False)
        return stat.S_ISDIR(st.st_mode)
