"""Changes to the merged namespace (the kernel's fs/overlayfs/dir.c).

Creating, removing and renaming names: every change lands in the upper layer, and a name that still
exists in a lower layer is hidden by a whiteout. Every operation changes what users see with exactly
one system call on the upper — its *commit point* — so that a crash or a failing step leaves the
view as it was before or as it is after, never a mixture (docs/layer-format.md, section 13):

* steps before the commit point change nothing users can see: copy-ups, a redirect or an opaque
  mark on a directory about to move, a hard-link count's pending record (:mod:`cowfs.core.nlink`),
  objects built in ``WORK/tmp`` (a new object that must belong to someone else than the daemon,
  or that replaces a whiteout, is created, chowned and marked there, then renamed into place);
* the commit point: ``mknod`` of a 0/0 whiteout, ``renameat2`` (with ``RENAME_WHITEOUT`` when the
  old name must stay hidden, ``RENAME_EXCHANGE`` to replace a whiteout by a directory), ``linkat``,
  ``unlink``, or a ``rename`` of a finished object out of the work directory;
* after it, only cleanup that users cannot see: removing what was swapped out into ``WORK/tmp``
  (else removed at the next mount), settling a pending count.

Whiteouts are 0/0 character devices, made in one step with the move that needs them
(``RENAME_WHITEOUT``), as the kernel makes them. On an upper filesystem without them (probed at
mount, :mod:`cowfs.core.workdir`), cowfs falls back to xattr whiteouts, and a rename that leaves a
whiteout is then two steps (known limit).

A directory that has lower content is renamed by copying up the directory alone and recording its
lower location in ``user.overlay.redirect`` (the kernel's ``redirect_dir=on``), in O(1).

Namespace changes hold one lock (:attr:`Namespace.lock`) for their few system calls, so that paths
recorded in pending counts stay still; copy-ups of file data happen before it is taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

from ..core import nlink, origins, realfs, schema
from ..core.layers import Layer
from ..core.resolve import Found, Real, is_hidden_name, probe
from ..core.workdir import WorkDir
from . import acl
from .copyup import CopyUp, copy_attributes, copy_xattrs
from .inodes import Inode, InodeTable
from .namei import Namei
from .readdir import candidate_names
from .upperdata import Need

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


# --- the names the inodes' references follow (cowfs.core.refs)
# -------------------------------------


def _leaving(inode: Inode, parent_upper: Real, name: str) -> None:
    """The upper object at ``name`` in ``parent_upper``, ``inode``'s, is about to lose that name
    (called under the namespace lock): if the inode reaches it by that name, it is pinned."""
    upper = inode.upper
    if upper is not None and upper.at is not None and parent_upper.at is not None:
        upper.at.cache.leaving(upper.at, (parent_upper.at, name))


@contextlib.contextmanager
def _moving(inode: Inode, old: tuple[Real, str], new: tuple[Real, str]) -> Iterator[None]:
    """Around the ``renameat2`` that moves ``inode``'s upper object from ``old`` to ``new``
    (under the namespace lock): its reference follows it, and while the call runs it is
    reached by either name (:meth:`cowfs.core.refs.Descriptors.moving`)."""
    upper = inode.upper
    ref = upper.at if upper is not None else None
    if ref is None or old[0].at is None or new[0].at is None or not ref.cache.moving(
            ref, (old[0].at, old[1]), (new[0].at, new[1])):
        yield
        return
    try:
        yield
    except BaseException:
        ref.cache.not_moved(ref)
        raise
    ref.cache.moved(ref)


class Namespace:
    """The namespace operations of one mount."""

    def __init__(self, upper: Layer, work: WorkDir, table: InodeTable, namei: Namei,
                 copy_up: CopyUp) -> None:
        self.upper = upper
        self.work = work
        self.table = table
        #: Every lookup of a name in the merged view (:mod:`cowfs.daemon.namei`).
        self.namei = namei
        self.copy_up = copy_up
        #: Held by every namespace change around its system calls (never across a data copy).
        self.lock = threading.RLock()

    # --- looking names up (cowfs.daemon.namei) ------------------------------------------------

    def is_empty_dir(self, directory: Inode) -> bool:
        return not any(self.namei.shows(directory, name)
                       for name in candidate_names(directory, ()))

    def _looked_up(self, parent: Inode, name: str) -> Inode:
        """The inode at ``name``, with one lookup counted that the caller must give back
        (``table.forget(number, 1)``): it keeps the inode alive while the change runs."""
        inode = self.namei.lookup(parent, name)
        if inode is None:
            raise OSError(errno.ENOENT, "no such file or directory", name)
        return inode

    # --- upper-layer primitives ---------------------------------------------------------------

    @staticmethod
    def _slot(parent_upper: Real, name: str) -> Slot:
        found = probe(parent_upper, name)
        if found is None:
            return Slot.EMPTY
        if isinstance(found, Found):
            os.close(found.obj.fd)
            return Slot.OBJECT
        return Slot.WHITEOUT

    def _upper_path(self, parent_upper: Real, name: str) -> tuple[str, ...]:
        """Where ``name`` in an upper directory is, below the upper root (for pending records)."""
        root = os.readlink(realfs.proc_path(self.upper.root_fd)).rstrip("/")
        path = os.readlink(realfs.proc_path(parent_upper.fd))
        if path == root:
            return (name,)
        if not path.startswith(root + "/"):
            raise OSError(errno.EIO, f"cannot locate {path!r} in the upper layer {root!r}")
        return (*path[len(root) + 1:].split("/"), name)

    def _count_change(self, entry: Real, parent_upper: Real, name: str,
                      expect: schema.Expect) -> schema.Pending | None:
        """Record that one lower name of a hard-link set is about to leave the lower layer's count
        (see :mod:`cowfs.core.nlink`); None when ``entry`` is not an index entry."""
        old = nlink.current(entry.fd, self.upper.root_fd)
        if old is None:
            return None
        pending = schema.Pending(max(old - 1, 0), old, expect, self._upper_path(parent_upper, name))
        nlink.begin(entry.fd, pending, self.upper.root_fd)
        return pending

    def _counted(self, entry: Real | None, parent_upper: Real, name: str, expect: schema.Expect,
                 change: Callable[[], None], *, strict: bool = False) -> None:
        """Run ``change`` with the count of ``entry`` following it. ``strict``: ``change`` is a
        step before the operation's commit point, and the operation fails unless the count is
        written (the record's path is about to move)."""
        pending = None if entry is None else self._count_change(entry, parent_upper, name, expect)
        try:
            change()
        except BaseException:
            if pending is not None and entry is not None:
                nlink.abort(entry.fd)
            raise
        if pending is not None and entry is not None:
            nlink.finish(entry.fd, pending, strict=strict)

    def _settle_count(self, inode: Inode) -> None:
        """Before a name of an index entry moves or goes: a pending record left by an earlier
        change whose last write failed names a path, which must not change under it."""
        upper = inode.upper
        # Only an index entry carries a record: it is indexed, or has several upper names.
        if upper is not None and not inode.is_dir and (upper.indexed or upper.nlink > 1):
            nlink.settle_pending(upper.fd, self.upper.root_fd)

    def _mark_xwhiteouts(self, directory: Inode) -> Real:
        """Mark a directory's upper as holding xattr whiteouts, before the first one is placed
        (only without device whiteouts)."""
        upper = self.copy_up.ensure(directory)
        if upper.mark is schema.DirMark.PLAIN:
            realfs.setxattr(upper.fd, schema.XATTR_OPAQUE, schema.OPAQUE_HAS_XWHITEOUTS)
            upper = dataclasses.replace(upper, mark=schema.DirMark.XWHITEOUTS)
            directory.replace_top(upper)
        return upper

    def _new_xattr_whiteout(self) -> str:
        temp = self.work.temp_name()
        fd = realfs.create_file(self.work.tmp_fd, temp, 0o600, os.O_WRONLY)
        os.close(fd)
        try:
            path_fd = realfs.open_path(self.work.tmp_fd, temp)
            if path_fd is None:
                raise OSError(errno.ENOENT, "whiteout vanished from the work directory")
            try:
                realfs.setxattr(path_fd, schema.XATTR_WHITEOUT, b"")
            finally:
                os.close(path_fd)
        except BaseException:
            self.work.discard(temp)
            raise
        return temp

    def _whiteout_at(self, parent: Inode, name: str, over: Slot) -> None:
        """Hide ``name`` of the lower layers in one step; ``over`` is what the upper holds there."""
        if over is Slot.WHITEOUT:
            return
        if self.work.features.device_whiteouts:
            parent_upper = self.copy_up.ensure(parent)
            if over is Slot.EMPTY:
                realfs.mknod_whiteout(parent_upper.fd, name)
                return
            temp = self.work.temp_name()
            realfs.rename(parent_upper.fd, name, self.work.tmp_fd, temp,
                          realfs.RENAME_WHITEOUT | realfs.RENAME_NOREPLACE)
            self.work.discard(temp)
            return
        parent_upper = self._mark_xwhiteouts(parent)
        temp = self._new_xattr_whiteout()
        try:
            flags = realfs.RENAME_NOREPLACE if over is Slot.EMPTY else realfs.RENAME_EXCHANGE
            realfs.rename(self.work.tmp_fd, temp, parent_upper.fd, name, flags)
        except BaseException:
            self.work.discard(temp)
            raise
        self.work.discard(temp)

    def _remove_upper(self, parent_upper: Real, name: str, is_dir: bool) -> None:
        """Delete an upper object that hides nothing below; a directory (which may hold
        whiteouts) leaves in one rename into the work dir and is deleted there."""
        if not is_dir:
            realfs.unlink(parent_upper.fd, name)
            return
        try:
            realfs.rmdir(parent_upper.fd, name)
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            temp = self.work.temp_name()
            realfs.rename(parent_upper.fd, name, self.work.tmp_fd, temp, realfs.RENAME_NOREPLACE)
            self.work.discard(temp)

    # --- creating -----------------------------------------------------------------------------

    def _new_object(self, parent: Inode, name: str, caller: Caller | None, mode: int,
                    make: Callable[[int, str], None], existing: Inode | None = None) -> Inode:
        """Create an object with ``make(dirfd, name)``: a new one, owned by ``caller`` (with the
        group of a set-group-ID directory, and inheriting its set-group-ID bit if it is a
        directory), or, with ``caller`` None, a new name of ``existing`` (a hard link).

        Where the daemon would give it its right owner and mode anyway, it is made in place: one
        system call, which also tells whether anything is in the way (EEXIST). Otherwise, or over
        a whiteout, it is made in the work directory, given owner, mode and (over a whiteout, for
        a directory) its opaque mark, and renamed into place.
        """
        check_name(name)
        if is_hidden_name(parent is self.table.root, name):
            raise OSError(errno.EPERM, "name reserved for the work directory", name)
        parent_upper = self.copy_up.ensure(parent)
        owner: tuple[int, int] | None = None
        natural = True
        if caller is not None:
            # One fstat of the parent for the owner, the daemon's own, and an inherited S_ISGID.
            st = parent_upper.stat()
            sgid = bool(st.st_mode & stat.S_ISGID)
            owner = (caller.uid, st.st_gid if sgid else caller.gid)
            natural = owner == (os.geteuid(), st.st_gid if sgid else os.getegid())
            if sgid and stat.S_ISDIR(mode):
                mode |= stat.S_ISGID  # inherited, as the kernel does for directories
        setid = mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(mode)
        with self.lock:
            fd = None
            slot = Slot.EMPTY
            if natural and not setid:
                try:
                    make(parent_upper.fd, name)
                except FileExistsError:
                    slot = self._slot(parent_upper, name)  # a whiteout, or an object
                else:
                    fd = realfs.open_path(parent_upper.fd, name)
                    if fd is None:
                        raise OSError(errno.ENOENT, "new object vanished", name)
            else:
                slot = self._slot(parent_upper, name)
            if fd is None:
                if slot is Slot.OBJECT:
                    raise OSError(errno.EEXIST, "file exists", name)
                fd = self._build_new(parent_upper, name, slot, owner, mode, make)
        # The commit point is behind: the change is made, and must be reported as made.
        if existing is not None:
            # A new name of an object already known: that inode, one more lookup and name (no
            # origin to read again, which could fail now).
            again = self.table.named_again(existing, parent, name)
            if again is not None:
                os.close(fd)
                return again
        try:
            st = os.fstat(fd)  # nothing to reply with if it fails: the one error left here
        except BaseException:
            os.close(fd)
            raise
        # Its mark is known without reading it: opaque for a directory made over a whiteout.
        mark = schema.DirMark.OPAQUE if stat.S_ISDIR(st.st_mode) and slot is not Slot.EMPTY else (
            schema.DirMark.PLAIN)
        real = Real(self.upper, fd, st.st_mode, mark, nlink=st.st_nlink, ino=st.st_ino,
                    at=parent_upper.named(name, st))
        if existing is None:
            return self.table.remember((real,), parent, name)  # new: no origin to read
        # A new name of an object forgotten meanwhile: looked up, as it may have an origin.
        return self.namei.remember((real,), parent, name)

    def _build_new(self, parent_upper: Real, name: str, slot: Slot, owner: tuple[int, int] | None,
                   mode: int, make: Callable[[int, str], None]) -> int:
        temp = self.work.temp_name()
        tmp = self.work.tmp_fd
        try:
            make(tmp, temp)
        except BaseException:
            self.work.discard(temp)
            raise
        fd = realfs.open_path(tmp, temp)
        try:
            if fd is None:
                raise OSError(errno.ENOENT, "new object vanished from the work directory")
            if owner is not None:
                realfs.chown(fd, *owner)
            acls = self._give_acls(parent_upper, fd, mode)
            if acls or (mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISLNK(mode)):
                # chown clears the set-ID bits, and mkdir ignores them (it inherits S_ISGID from
                # its parent, which a directory built in the work directory does not have).
                realfs.chmod(fd, stat.S_IMODE(mode))
            if slot is Slot.EMPTY:
                realfs.rename(tmp, temp, parent_upper.fd, name, realfs.RENAME_NOREPLACE)
            elif stat.S_ISDIR(mode):
                realfs.setxattr(fd, schema.XATTR_OPAQUE, schema.OPAQUE_YES)
                # rename cannot put a directory over a non-directory: swap, then drop the whiteout
                realfs.rename(tmp, temp, parent_upper.fd, name, realfs.RENAME_EXCHANGE)
            else:
                realfs.rename(tmp, temp, parent_upper.fd, name)
        except BaseException:
            if fd is not None:
                os.close(fd)
            self.work.discard(temp)
            raise
        if slot is not Slot.EMPTY and stat.S_ISDIR(mode):
            self.work.discard(temp)
        return fd

    @staticmethod
    def _new_mode(parent: Inode, mode: int, caller: Caller) -> int:
        """The mode of a new object: the caller's umask applied, unless ``parent`` has a default
        ACL, which applies instead (the kernel's ``posix_acl_create``; the real filesystem gives
        the object the ACL itself, or :meth:`_give_acls` does). A directory's lack of one is
        remembered (``Inode.absent_on``) until an xattr of it changes or it is copied up: most
        directories have none, and ``tar -x`` creates thousands of files in one."""
        default = parent.xattr_unless_absent(parent.top, acl.DEFAULT)
        if default is None:
            return mode & ~caller.umask
        return acl.inherit(default, mode)[0]

    @staticmethod
    def _give_acls(parent_upper: Real, fd: int, mode: int) -> bool:
        """Give an object built in the work directory the ACLs it would have had if made in its
        parent: whether there were any."""
        default = realfs.getxattr(parent_upper.fd, acl.DEFAULT)
        if default is None or stat.S_ISLNK(mode):
            return False
        access = acl.inherit(default, mode)[1]
        if access is not None:
            realfs.setxattr(fd, acl.ACCESS, access)
        if stat.S_ISDIR(mode):
            realfs.setxattr(fd, acl.DEFAULT, default)
        return True

    def create(self, parent: Inode, name: str, mode: int, caller: Caller) -> tuple[Inode, int]:
        """Create a regular file; return it and a descriptor open for reading and writing."""
        mode = self._new_mode(parent, stat.S_IFREG | stat.S_IMODE(mode), caller)
        opened: list[int] = []

        def make(dirfd: int, fname: str) -> None:
            opened.append(realfs.create_file(dirfd, fname, stat.S_IMODE(mode)))

        try:
            inode = self._new_object(parent, name, caller, mode, make)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        return inode, opened[0]

    def mkdir(self, parent: Inode, name: str, mode: int, caller: Caller) -> Inode:
        mode = self._new_mode(parent, stat.S_IFDIR | stat.S_IMODE(mode), caller)
        return self._new_object(parent, name, caller, mode,
                                lambda d, n: realfs.mkdir(d, n, stat.S_IMODE(mode)))

    def mknod(self, parent: Inode, name: str, mode: int, rdev: int, caller: Caller) -> Inode:
        if schema.is_device_whiteout(mode, rdev):
            # It would read back as a whiteout and vanish; the kernel refuses it too.
            raise OSError(errno.EPERM, "a 0/0 character device is a whiteout", name)
        mode = self._new_mode(parent, stat.S_IFMT(mode) | stat.S_IMODE(mode), caller)
        return self._new_object(parent, name, caller, mode,
                                lambda d, n: realfs.mknod(d, n, mode, rdev))

    def symlink(self, parent: Inode, name: str, target: str, caller: Caller) -> Inode:
        return self._new_object(parent, name, caller, stat.S_IFLNK | 0o777,
                                lambda d, n: realfs.symlink(d, n, target))

    def link(self, inode: Inode, parent: Inode, name: str) -> Inode:
        """A new name for an object. Its upper copy gains a link (for a lower hard-link set, its
        index entry), which the merged link count follows with no write of its own."""
        if inode.is_dir:
            raise OSError(errno.EPERM, "hard links to directories are not allowed", name)
        upper = self.copy_up.ensure(inode, Need.METADATA)
        return self._new_object(parent, name, None, upper.mode,
                                lambda d, n: realfs.link(upper.fd, d, n), existing=inode)

    # --- removing -----------------------------------------------------------------------------

    @staticmethod
    def check_may_delete(parent: Inode, child: Inode) -> None:
        """EPERM if a name cannot leave ``parent``: the directory or the object is immutable or
        append-only (the kernel's may_delete, which checks this before the type of the object
        and before whether a directory is empty). The real filesystem would refuse a plain
        unlink itself, but not the whiteout that hides a lower name, nor say it first."""
        if realfs.protection(parent.top.fd) or realfs.protection(child.top.fd):
            raise OSError(errno.EPERM, "immutable or append-only")

    def unlink(self, parent: Inode, name: str) -> None:
        child = self._looked_up(parent, name)
        try:
            self.check_may_delete(parent, child)
            if child.is_dir:
                raise OSError(errno.EISDIR, "is a directory", name)
            self._remove(parent, name, child)
        finally:
            self.table.forget(child.number, 1)

    def rmdir(self, parent: Inode, name: str) -> None:
        child = self._looked_up(parent, name)
        try:
            self.check_may_delete(parent, child)
            if not child.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory", name)
            if not self.is_empty_dir(child):
                raise OSError(errno.ENOTEMPTY, "directory not empty", name)
            self._remove(parent, name, child)
        finally:
            self.table.forget(child.number, 1)

    def _prepare_departure(self, inode: Inode) -> None:
        """One name of ``inode`` is about to go. If it is a lower hard-link set, copy it into the
        index first (outside the lock: this copies data), so that its count can follow."""
        if self.copy_up.is_hard_linked_lower(inode):
            self.copy_up.ensure(inode)

    def _remove(self, parent: Inode, name: str, child: Inode) -> None:
        self._prepare_departure(child)
        parent_upper = self.copy_up.ensure(parent)
        with self.lock:
            slot = self._slot(parent_upper, name)
            below = self.namei.exists_below(parent, name)
            # A visible name with nothing in the upper is a lower name; if the object has an
            # upper copy all the same, that is its index entry, whose count loses this name.
            entry = child.upper if slot is Slot.EMPTY and not child.is_dir else None
            self._settle_count(child)
            if slot is Slot.OBJECT:
                _leaving(child, parent_upper, name)
            if below:
                self._counted(entry, parent_upper, name, schema.Expect.PRESENT,
                              lambda: self._whiteout_at(parent, name, slot))
            elif slot is not Slot.EMPTY:
                self._remove_upper(parent_upper, name, child.is_dir)
            child.drop_link(parent, name)

    # --- renaming -----------------------------------------------------------------------------

    def rename(self, old_parent: Inode, old_name: str, new_parent: Inode, new_name: str,
               flags: int) -> None:
        if flags & ~(realfs.RENAME_NOREPLACE | realfs.RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        check_name(new_name)
        if is_hidden_name(new_parent is self.table.root, new_name):
            raise OSError(errno.EPERM, "name reserved for the work directory", new_name)
        src = self._looked_up(old_parent, old_name)
        dst = self.namei.lookup(new_parent, new_name)
        try:
            self.check_may_delete(old_parent, src)
            if dst is not None:
                self.check_may_delete(new_parent, dst)
            self._check_rename(src, dst, flags, new_name)
            if dst is src:
                return  # the same object under both names: POSIX says do nothing
            self._prepare_rename(src, dst, old_parent, new_parent, flags)
            with self.lock:
                if flags & realfs.RENAME_EXCHANGE:
                    if dst is None:  # refused by _check_rename already
                        raise OSError(errno.ENOENT, "no such file or directory", new_name)
                    self._exchange(old_parent, old_name, src, new_parent, new_name, dst)
                else:
                    self._move(old_parent, old_name, src, new_parent, new_name, dst)
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

    def _prepare_rename(self, src: Inode, dst: Inode | None, old_parent: Inode,
                        new_parent: Inode, flags: int) -> None:
        """Copy-ups that may copy data, before the lock is taken."""
        self.copy_up.ensure(old_parent)
        self.copy_up.ensure(new_parent)
        self.copy_up.ensure(src, Need.METADATA)
        if dst is not None and flags & realfs.RENAME_EXCHANGE:
            self.copy_up.ensure(dst, Need.METADATA)
        elif dst is not None:
            self._prepare_departure(dst)

    def _movable_upper(self, inode: Inode, parent_upper: Real, name: str) -> Real:
        """Make ``name`` an upper object that can move, without changing what users see.

        A directory with lower content records where that content is (its redirect: O(1), where
        the kernel's default fails with EXDEV). A lower name of a hard-link set is linked to its
        index entry, the count following (see :mod:`cowfs.core.nlink`).
        """
        upper = self.copy_up.ensure(inode, Need.METADATA)
        if inode.is_dir:
            return self._redirect(inode, upper) if inode.lowers else upper
        self._settle_count(inode)
        if self._slot(parent_upper, name) is Slot.EMPTY:
            self._counted(upper, parent_upper, name, schema.Expect.LINKED,
                          lambda: self.copy_up.link_name(upper, parent_upper, name), strict=True)
        return upper

    def _redirect(self, inode: Inode, upper: Real) -> Real:
        """Record the lower location of a directory about to move (absolute: parents may move)."""
        origin = self._lower_path(inode.lowers[0])
        if upper.redirect is not None and upper.redirect.components == origin:
            return upper
        realfs.setxattr(upper.fd, schema.XATTR_REDIRECT, schema.format_redirect(origin))
        upper = dataclasses.replace(upper, redirect=schema.Redirect(True, origin))
        inode.replace_top(upper)
        return upper

    @staticmethod
    def _lower_path(real: Real) -> tuple[str, ...]:
        """Where a lower object sits below its layer's root (layers never change, so this is its
        permanent address)."""
        path = origins.lower_path(real)
        if path is None:
            raise OSError(errno.EIO, f"cannot locate {real!r} in lower layer {real.layer.path}")
        return path

    def _make_opaque_if_needed(self, inode: Inode, parent: Inode, name: str) -> None:
        """An upper-only directory moved over a name that lower layers have must not merge with
        them. (A redirected one merges only with its redirect target.) Invisible where it is."""
        upper = inode.upper
        if upper is None or not inode.is_dir or upper.opaque or inode.lowers:
            return
        if self.namei.exists_below(parent, name):
            realfs.setxattr(upper.fd, schema.XATTR_OPAQUE, schema.OPAQUE_YES)
            inode.replace_top(dataclasses.replace(upper, mark=schema.DirMark.OPAQUE))

    def _exchange(self, old_parent: Inode, old_name: str, src: Inode, new_parent: Inode,
                  new_name: str, dst: Inode) -> None:
        old_upper = self.copy_up.ensure(old_parent)
        new_upper = self.copy_up.ensure(new_parent)
        self._movable_upper(src, old_upper, old_name)
        self._movable_upper(dst, new_upper, new_name)
        self._make_opaque_if_needed(src, new_parent, new_name)
        self._make_opaque_if_needed(dst, old_parent, old_name)
        old, new = (old_upper, old_name), (new_upper, new_name)
        with _moving(src, old, new), _moving(dst, new, old):
            realfs.rename(old_upper.fd, old_name, new_upper.fd, new_name,
                          realfs.RENAME_EXCHANGE)
        src.move_link(old_parent, old_name, new_parent, new_name)
        dst.move_link(new_parent, new_name, old_parent, old_name)

    def _move(self, old_parent: Inode, old_name: str, src: Inode, new_parent: Inode,
              new_name: str, dst: Inode | None) -> None:
        """Move ``src`` to the new name in one ``renameat2``, leaving a whiteout at the old name if
        a lower layer has it there."""
        old_upper = self.copy_up.ensure(old_parent)
        new_upper = self.copy_up.ensure(new_parent)
        self._movable_upper(src, old_upper, old_name)
        self._make_opaque_if_needed(src, new_parent, new_name)
        slot = self._slot(new_upper, new_name)
        if dst is not None and slot is Slot.OBJECT:
            _leaving(dst, new_upper, new_name)  # its upper object goes: pinned while known
        if dst is not None and dst.is_dir and slot is Slot.OBJECT:
            self._clear_empty(dst, new_upper, new_name)
        if dst is not None:
            self._settle_count(dst)
        # A lower name of a hard-link set replaced here leaves the set's count.
        entry = dst.upper if dst is not None and not dst.is_dir and slot is Slot.EMPTY else None
        below = self.namei.exists_below(old_parent, old_name)
        device = self.work.features.device_whiteouts

        def commit() -> None:
            whiteout = realfs.RENAME_WHITEOUT if below and device else 0
            if slot is Slot.WHITEOUT and src.is_dir:
                # A directory cannot replace a whiteout (a non-directory): swap them. The
                # whiteout then sits at the old name, where it is needed or hides nothing.
                realfs.rename(old_upper.fd, old_name, new_upper.fd, new_name,
                              realfs.RENAME_EXCHANGE)
            elif slot is Slot.EMPTY:
                realfs.rename(old_upper.fd, old_name, new_upper.fd, new_name,
                              realfs.RENAME_NOREPLACE | whiteout)
            else:
                realfs.rename(old_upper.fd, old_name, new_upper.fd, new_name, whiteout)

        stray = None
        if slot is Slot.WHITEOUT and src.is_dir and not below:
            stray = self.work.note_stray_whiteout(self._upper_path(old_upper, old_name))
        try:
            with _moving(src, (old_upper, old_name), (new_upper, new_name)):
                self._counted(entry, new_upper, new_name, schema.Expect.PRESENT, commit)
        except BaseException:
            if stray is not None:
                self.work.discard(stray)
            raise
        if stray is not None and self._drop_stray_whiteout(old_upper, old_name):
            self.work.discard(stray)
        elif below and not device:  # two steps: see the module docstring
            self._whiteout_at(old_parent, old_name, self._slot(old_upper, old_name))
        src.move_link(old_parent, old_name, new_parent, new_name)
        if dst is not None:
            dst.drop_link(new_parent, new_name)

    def _drop_stray_whiteout(self, parent_upper: Real, name: str) -> bool:
        """A whiteout over nothing hides nothing: removing it is cleanup, not a change (after a
        crash, the note in the work directory has the next mount remove it)."""
        try:
            realfs.unlink(parent_upper.fd, name)
        except OSError as e:
            log.warning("cannot remove a whiteout that hides nothing (%s): %s", name, e.strerror)
            return False
        return True

    def _clear_empty(self, directory: Inode, parent_upper: Real, name: str) -> None:
        """Make the upper of an empty-looking directory really empty, so that a rename can
        replace it (the kernel's ``ovl_clear_empty``): an opaque empty copy is built in the work
        dir and exchanged with it. Users see the same empty directory before and after."""
        upper = self.copy_up.ensure(directory)
        if not realfs.list_names(upper.fd):
            return
        st = upper.stat()
        temp = self.work.temp_name()
        tmp = self.work.tmp_fd
        realfs.mkdir(tmp, temp, 0o700)
        try:
            fd = realfs.open_path(tmp, temp)
            if fd is None:
                raise OSError(errno.ENOENT, "directory vanished from the work directory")
            try:
                copy_xattrs(upper, fd)
                realfs.setxattr(fd, schema.XATTR_OPAQUE, schema.OPAQUE_YES)
                copy_attributes(st, fd)
            finally:
                os.close(fd)
            realfs.rename(tmp, temp, parent_upper.fd, name, realfs.RENAME_EXCHANGE)
        except BaseException:
            self.work.discard(temp)
            raise
        self.work.discard(temp)
