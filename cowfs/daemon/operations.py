"""The pyfuse3 adapter: a protocol translator and nothing else.

What the filesystem looks like is decided in :mod:`cowfs.daemon.vfs`; this module converts requests
and replies (bytes names, ``EntryAttributes``, file-handle numbers), turns ``OSError`` into
``FUSEError`` once, and decides what runs in a worker thread: syncing file data, truncations,
copying much data (a large copy-up: :mod:`cowfs.core.inline`), and reads that may wait for the disk,
so that a long copy-up never stops the rest of the filesystem.

Everything else runs inline on the trio loop, because a worker thread is expensive: handing a call
to one and back costs about 100-150 µs of CPU on the benchmark machine (docs/performance.md),
against 2-20 µs for a ``pread`` served from the page cache, and 20-100 µs for an ``unlink``, a
``rename`` or the copy-up of a small file, which therefore run inline too
(:meth:`Operations._short`: unless a worker thread is busy, or the copy-up turns out to be
large). Reads are first tried without blocking (:meth:`FileHandle.read_cached`, into one
reused buffer), and writes of up to :data:`INLINE_WRITE_MAX` bytes go straight into the page
cache of the upper file (unless the file is open ``O_SYNC``/``O_DSYNC``, when every write waits for
the disk); the price is that a write the kernel throttles (too many dirty pages) holds up the
other requests meanwhile.

With the writeback cache (``writeback=True``, off by default) the kernel collects writes in its page
cache and sends them in large batches, and it may read a file to fill a partly written page: every
open for writing is then read-write on the real file.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import stat
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio
from pyfuse3 import FileHandleT, FileNameT, FlagT, InodeT, ModeT, XAttrNameT

from ..core import inline
from ..core.refs import in_worker
from . import fileattr
from .handles import FileHandle, wants_write
from .inodes import Inode
from .namei import Held
from .readdir import DirHandle, Listing, Snapshots
from .vfs import Caller, Overlay, SetAttr

log = logging.getLogger(__name__)

#: A listing with attributes (readdirplus) gives an entry without an inode to a name the kernel
#: holds already (:meth:`Overlay.held_listed`); finding that out costs an ``fstatat`` that a
#: lookup makes again where the name is not held. After this many such entries in a row (a
#: directory listed before its files were looked up: ``ls -l``, a cold walk) a reply stops
#: asking.
_HELD_MISSES = 4

#: What ``os.fsdecode`` does, without its two calls: the name of every lookup is decoded so.
_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

P = ParamSpec("P")
R = TypeVar("R")


def _errno_boundary(
        fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Translate OSError into FUSEError; anything else is a bug, logged with its traceback."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            if e.errno is None:
                log.exception("%s: OSError without errno", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from e
            log.debug("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(e.errno) from e
        except Exception as e:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from e
        finally:
            # Here, on the loop's thread, no request is between getting a descriptor and using
            # it: the cache may close what it drops (cowfs.core.refs).
            cast("Operations", args[0]).overlay.request_done()

    return wrapper


def _caller(ctx: pyfuse3.RequestContext) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.umask)


def _in_group(ctx: pyfuse3.RequestContext, gid: int) -> bool:
    """Whether the caller is in group ``gid``: its own group or a supplementary one (which the
    request does not carry: read from /proc; not in it if the caller is gone)."""
    if ctx.gid == gid:
        return True
    try:
        with open(f"/proc/{ctx.pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return str(gid) in line.split()[1:]
    except OSError:
        pass
    return False


def _drop_cached_attrs(inode: InodeT) -> None:
    """Make the kernel ask for the attributes of ``inode`` again (after a change it does not
    expect to change them). Where it refuses (no such inode in its cache, no kernel at all) there
    is nothing cached to drop."""
    try:
        pyfuse3.invalidate_inode(inode, attr_only=True)
    except OSError as e:
        log.debug("attributes of inode %d not invalidated: %s", inode, e)


def has_file_calls() -> bool:
    """Whether this pyfuse3 passes on fallocate, lseek (``SEEK_DATA``/``SEEK_HOLE``) and ioctl
    requests (``patches/pyfuse3/0002``).

    A stock pyfuse3 registers no handler for them with libfuse, which answers ENOSYS: the kernel
    then fails fallocate with EOPNOTSUPP, answers SEEK_DATA/SEEK_HOLE itself (all data), and
    fails chattr/lsattr with ENOTTY. ``COWFS_STOCK_PYFUSE3=1`` makes cowfs answer ENOSYS itself,
    as on a stock pyfuse3 (the tests use it to check that path).
    """
    if os.environ.get("COWFS_STOCK_PYFUSE3") == "1":
        return False
    return all(hasattr(pyfuse3.Operations, name) for name in ("fallocate", "lseek", "ioctl"))


#: ``fuse_ioctl_in.flags``: the handle is a directory's (from opendir).
FUSE_IOCTL_DIR = 1 << 4

#: Reads up to this size that the page cache cannot serve run inline too, from a local disk
#: (:meth:`FileHandle.read_local`): a 4 KiB read from the disk takes about 60 µs here, handing it
#: to a worker thread and back 100-150 µs. Larger ones (readahead) go to a worker thread.
INLINE_READ_MAX = 64 << 10

#: Writes up to this size run inline: copying them into the page cache costs less than a thread
#: hand-off. The kernel sends at most max_write (1 MiB) per request.
INLINE_WRITE_MAX = 1 << 20


#: Where pyfuse3 keeps ``fuse_param.ino`` in an ``EntryAttributes`` object: right after the object
#: header (a Cython class without methods of its own has no vtable pointer).
_NODE_ID_OFFSET = object.__basicsize__


def _clear_node_id(entry: pyfuse3.EntryAttributes) -> bool:
    """Set the FUSE node id of ``entry`` to 0 and leave its ``st_ino`` (the dirent's ``d_ino``).

    pyfuse3 has no way to set one without the other, so this writes the field in place, after
    checking that it is where expected: ``st_ino`` reads ``fuse_param.ino`` back, so a layout that
    differs shows (then nothing is written, and False is returned).
    """
    wanted = entry.st_ino
    field = ctypes.c_uint64.from_address(id(entry) + _NODE_ID_OFFSET)
    if wanted == 0 or field.value != wanted:
        return False
    field.value = 0
    if entry.st_ino != 0:  # pragma: no cover  (the layout check above passed)
        field.value = wanted
        return False
    return True


def can_inherit_acls() -> bool:
    """Whether this pyfuse3 can leave the umask to cowfs (``Operations.enable_dont_mask``,
    ``patches/pyfuse3/0004``), so that a new object in a directory with a default ACL takes that
    ACL in place of the umask, as on the kernel's overlayfs. Otherwise the kernel applies the
    umask before cowfs sees the mode, and the inherited ACL is masked by it too.
    ``COWFS_STOCK_PYFUSE3=1`` makes cowfs behave as on a stock pyfuse3."""
    if os.environ.get("COWFS_STOCK_PYFUSE3") == "1":
        return False
    return hasattr(pyfuse3.Operations, "enable_dont_mask")


def completes_direct_writes() -> bool:
    """Whether this pyfuse3 can turn asynchronous direct I/O off (``Operations.enable_async_dio``,
    ``patches/pyfuse3/0005``). With it off, the kernel completes an ``io_submit`` of ``O_DIRECT``
    writes before the call returns and then drops the written range's cached pages, as after a
    synchronous direct write; with it on, it drops none after the write, and a buffered read that
    raced the write can leave the old bytes cached. ``COWFS_STOCK_PYFUSE3=1`` makes cowfs behave as
    on a stock pyfuse3."""
    if os.environ.get("COWFS_STOCK_PYFUSE3") == "1":
        return False
    return hasattr(pyfuse3.Operations, "enable_async_dio")


def kernel_can_open_dirs() -> bool:
    """Whether this pyfuse3 passes the directory's inode to ``readdir`` (``ReaddirToken.inode``,
    ``patches/pyfuse3/0001``), so that ``opendir`` can be left to the kernel."""
    return can_cache_listings() and hasattr(pyfuse3.ReaddirToken, "inode")


def can_list_plain() -> bool:
    """Whether this pyfuse3 can answer listings without attributes (``ReaddirToken.plus``,
    ``patches/pyfuse3/0001``)."""
    return can_cache_listings() and hasattr(pyfuse3.ReaddirToken, "plus")


def can_cache_listings() -> bool:
    """Whether this pyfuse3 lets ``opendir`` ask the kernel to cache listings.

    A pyfuse3 built with ``patches/pyfuse3/0001`` (``make setup`` builds one) accepts a
    ``FileInfo`` with ``cache_readdir`` from ``opendir``; a stock pyfuse3 does not, and cowfs then
    serves every listing itself. ``COWFS_STOCK_PYFUSE3=1`` makes cowfs behave as on a stock
    pyfuse3 (the tests use it to check that path).
    """
    if os.environ.get("COWFS_STOCK_PYFUSE3") == "1":
        return False
    return hasattr(pyfuse3.FileInfo(), "cache_readdir")


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers for one :class:`Overlay`.

    Listings are cached by the kernel when pyfuse3 allows it (:func:`can_cache_listings`) and the
    mount caches at all (``timeout`` above 0). Where pyfuse3 passes ``readdir`` the directory's
    inode (:func:`kernel_can_open_dirs`), the first ``opendir`` answers ENOSYS: the kernel then
    opens directories by itself, with its listing cache on, and sends no more ``opendir`` and
    ``releasedir`` requests (two of the three requests a warm directory walk made per directory);
    listings are then served from :class:`Snapshots`, and ``fsyncdir``, which gets no inode,
    syncs the upper's filesystem. Otherwise ``opendir`` returns ``cache_readdir`` and
    ``keep_cache``. Either way the cache is exact, because every change to a directory's
    entries reaches cowfs as a request on that directory (create, unlink, rename, link, mkdir,
    rmdir, mknod, symlink), and the kernel drops its cached listing of a directory when such a
    request succeeds, or when its mtime changes; what cowfs changes on its own (whiteouts,
    opaque marks, the copy-up of a directory, the index) is either hidden from listings or done
    within one of those requests.
    """

    supports_dot_lookup = False

    def __init__(self, overlay: Overlay, *, timeout: float, writeback: bool = False,
                 after_init: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.overlay = overlay
        self.timeout = timeout
        #: Read by pyfuse3 when the kernel connects.
        self.enable_writeback_cache = writeback
        #: Read by pyfuse3 at INIT: the kernel applies POSIX ACLs itself (permission checks, the
        #: mode an access ACL implies, S_ISGID dropped for a caller outside the group); cowfs
        #: gives new objects their directory's default ACL (cowfs.daemon.acl).
        self.enable_acl = True
        #: Read by a pyfuse3 with patches/pyfuse3/0004 (:func:`can_inherit_acls`).
        self.enable_dont_mask = can_inherit_acls()
        #: Read by a pyfuse3 with patches/pyfuse3/0005 (:func:`completes_direct_writes`).
        self.enable_async_dio = not completes_direct_writes()
        #: Whether opendir lets the kernel cache the listing (see the class docstring).
        self.cache_listings = timeout > 0 and can_cache_listings()
        #: Whether the kernel opens directories itself (see the class docstring).
        self.kernel_opens_dirs = self.cache_listings and kernel_can_open_dirs()
        self._snapshots = Snapshots()
        #: Read by pyfuse3 at INIT: let the kernel ask for listings without attributes where it
        #: will not use them (a plain ``ls``), which cowfs answers without lookups (see readdir).
        self.enable_readdirplus_auto = can_list_plain()
        #: Whether fallocate, lseek and ioctl reach cowfs (:func:`has_file_calls`).
        self.file_calls = has_file_calls()
        self._after_init = after_init
        self._read_buf = bytearray(1 << 20)  # see read()
        self._numbers = itertools.count(1)
        self._files: dict[int, FileHandle] = {}
        self._dirs: dict[int, DirHandle] = {}
        #: Calls running in worker threads now (see :meth:`_short`).
        self._threads = 0

    def init(self) -> None:
        """Called while the kernel's INIT is answered; ``after_init`` runs once the answer is in."""
        if not self.file_calls:
            log.info("this pyfuse3 has no fallocate, lseek or ioctl handlers: fallocate fails "
                     "EOPNOTSUPP, chattr/lsattr fail ENOTTY (patches/pyfuse3/README.md)")
        if self._after_init is not None:
            try:
                token = trio.lowlevel.current_trio_token()
            except RuntimeError:  # not under trio (the handlers are being called directly)
                self._after_init()
                return
            token.run_sync_soon(self._after_init)

    # --- helpers ------------------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[..., R], *args: object) -> R:
        self._threads += 1
        try:
            # in_worker: the descriptors fn gets stay open until it returns (cowfs.core.refs).
            return await trio.to_thread.run_sync(in_worker, fn, *args)
        finally:
            self._threads -= 1

    async def _short(self, fn: Callable[..., R], *args: object) -> R:
        """Run a change that is usually short (a namespace change, a copy-up) inline, and in a
        worker thread where it may take long (:mod:`cowfs.core.inline`).

        Inline only while no worker thread runs: a thread may hold a lock that the change needs
        (an inode's copy-up lock during a large copy-up, the namespace lock), and the loop would
        wait for it, serving nothing meanwhile. With none running, nothing holds a lock, and an
        inline change cannot wait for one. A change that would copy much data, or from a lower
        that is not on a local disk, stops before the copy (:class:`cowfs.core.inline.TooLongError`,
        leaving nothing changed, as any failing copy does) and runs again in a thread.
        """
        if self._threads == 0:
            try:
                with inline.on_loop():
                    return fn(*args)
            except inline.TooLongError as e:
                log.debug("%s: %s: in a worker thread", getattr(fn, "__name__", fn), e.strerror)
        return await self._in_thread(fn, *args)

    def _attrs(self, inode: Inode, seen: os.stat_result | None = None
               ) -> pyfuse3.EntryAttributes:
        """The reply's attributes: the model's one record (:class:`cowfs.daemon.attrs.Attributes`),
        translated. ``seen``: the lookup's own ``lstat`` of the inode's topmost object."""
        attrs = self.overlay.attributes(inode, seen)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = InodeT(attrs.ino)
        entry.generation = 0
        entry.entry_timeout = self.timeout
        entry.attr_timeout = self.timeout
        entry.st_mode = ModeT(attrs.mode)
        entry.st_nlink = attrs.nlink
        entry.st_uid = attrs.uid
        entry.st_gid = attrs.gid
        entry.st_rdev = attrs.rdev
        entry.st_size = attrs.size
        entry.st_blksize = attrs.blksize
        entry.st_blocks = attrs.blocks
        entry.st_atime_ns = attrs.atime_ns
        entry.st_mtime_ns = attrs.mtime_ns
        entry.st_ctime_ns = attrs.ctime_ns
        return entry

    def _read_buffer(self, size: int) -> memoryview:
        if size > len(self._read_buf):
            self._read_buf = bytearray(size)
        return memoryview(self._read_buf)[:size]

    def _negative(self) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = InodeT(0)
        entry.entry_timeout = self.timeout
        return entry

    def _inode(self, number: int) -> Inode:
        return self.overlay.inode(number)

    def _new_fh(self, table: dict[int, R], handle: R) -> FileHandleT:
        number = next(self._numbers)
        table[number] = handle
        return FileHandleT(number)

    def _file(self, fh: int) -> FileHandle:
        try:
            return self._files[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _dir(self, fh: int) -> DirHandle:
        try:
            return self._dirs[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    # --- lookups and attributes ---------------------------------------------------------------

    @_errno_boundary
    async def lookup(self, parent_inode: InodeT, name: FileNameT,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        found = self.overlay.lookup_stat(self._inode(parent_inode),
                                         name.decode(_FS_ENCODING, _FS_ERRORS))  # os.fsdecode
        if found is None:
            return self._negative()
        return self._attrs(*found)

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        """The one handler without a reply: an exception here would end the mount, so a failure
        is logged and the next inode forgotten (the errno boundary's rule, without an errno to
        give). A partial file's unsaved map is written in a worker thread first, while the
        inode is still known, so that the release on the loop has nothing left to wait for."""
        for number, count in inode_list:
            try:
                unsaved = self.overlay.unsaved_before_forget(number, count)
                if unsaved is not None:
                    await self._in_thread(unsaved.save)
                self.overlay.forget(number, count)
            except Exception:
                log.exception("forget of inode %d failed (its descriptors may stay open)", number)

    @_errno_boundary
    async def getattr(self, inode: InodeT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._inode(inode))

    @_errno_boundary
    async def setattr(self, inode: InodeT, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: FileHandleT | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._inode(inode)
        mode = attr.st_mode if fields.update_mode else None
        if mode is not None and mode & stat.S_ISGID and ctx.uid != 0:
            gid = attr.st_gid if fields.update_gid else self.overlay.attributes(node).gid
            if not _in_group(ctx, gid):
                # The kernel's setattr_should_drop_sgid (Linux 6.2): S_ISGID goes when the
                # caller is outside the file's group. The kernel's FUSE, killing the set-ID bits
                # for a write or fallocate, keeps it unless the group may execute (the older
                # rule), so cowfs applies the rule to the mode it is sent (a chmod arrives with
                # the bit already dropped).
                mode &= ~stat.S_ISGID
        change = SetAttr(
            mode=mode,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        handle = self._files.get(fh) if fh is not None else None
        if change.size is not None:  # a truncation frees or copies blocks of any size
            await self._in_thread(self.overlay.setattr, node, change, handle)
        elif self.overlay.needs_copy_up(node):
            await self._short(self.overlay.setattr, node, change, handle)
        else:
            self.overlay.setattr(node, change, handle)
        return self._attrs(node)

    @_errno_boundary
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileNameT:
        return FileNameT(os.fsencode(self.overlay.readlink(self._inode(inode))))

    @_errno_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.overlay.statfs()
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(st, field))
        return data

    # --- namespace ----------------------------------------------------------------------------

    @_errno_boundary
    async def mknod(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self.overlay.mknod(self._inode(parent_inode), os.fsdecode(name), mode,
                                             rdev, _caller(ctx))
        return self._attrs(inode)

    @_errno_boundary
    async def mkdir(self, parent_inode: InodeT, name: FileNameT, mode: ModeT,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self.overlay.mkdir(self._inode(parent_inode), os.fsdecode(name), mode,
                                             _caller(ctx))
        return self._attrs(inode)

    @_errno_boundary
    async def symlink(self, parent_inode: InodeT, name: FileNameT, target: FileNameT,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self.overlay.symlink(self._inode(parent_inode), os.fsdecode(name),
                                               os.fsdecode(target), _caller(ctx))
        return self._attrs(inode)

    @_errno_boundary
    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: FileNameT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        linked = await self._short(self.overlay.link, self._inode(inode),
                                  self._inode(new_parent_inode), os.fsdecode(new_name))
        return self._attrs(linked)

    @_errno_boundary
    async def unlink(self, parent_inode: InodeT, name: FileNameT,
                     ctx: pyfuse3.RequestContext) -> None:
        # Unlinking a lower file with several names copies it into the index first.
        await self._short(self.overlay.unlink, self._inode(parent_inode),
                         os.fsdecode(name))

    @_errno_boundary
    async def rmdir(self, parent_inode: InodeT, name: FileNameT,
                    ctx: pyfuse3.RequestContext) -> None:
        await self._short(self.overlay.rmdir, self._inode(parent_inode),
                         os.fsdecode(name))

    @_errno_boundary
    async def rename(self, parent_inode_old: InodeT, name_old: FileNameT,
                     parent_inode_new: InodeT, name_new: FileNameT, flags: FlagT,
                     ctx: pyfuse3.RequestContext) -> None:
        await self._short(self.overlay.rename, self._inode(parent_inode_old),
                         os.fsdecode(name_old), self._inode(parent_inode_new),
                         os.fsdecode(name_new), int(flags))

    # --- files --------------------------------------------------------------------------------

    @_errno_boundary
    async def open(self, inode: InodeT, flags: FlagT,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._inode(inode)
        if self.enable_writeback_cache and flags & os.O_ACCMODE == os.O_WRONLY:
            # The kernel reads around partial-page writes through any open handle of the file.
            flags = FlagT(flags & ~os.O_ACCMODE | os.O_RDWR)
        if wants_write(flags) and self.overlay.needs_copy_up(node):
            handle = await self._short(self.overlay.open, node, int(flags))
        else:
            handle = self.overlay.open(node, int(flags))
        handle.direct = bool(flags & os.O_DIRECT)
        # Reads served from the page cache never reach cowfs, so a strictatime mount, where
        # each read sets the access time, starts every open with the file's pages dropped.
        return pyfuse3.FileInfo(fh=self._new_fh(self._files, handle),
                                keep_cache=not handle.strict_atime)

    @_errno_boundary
    async def create(self, parent_inode: InodeT, name: FileNameT, mode: ModeT, flags: FlagT,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        handle = self.overlay.create(self._inode(parent_inode), os.fsdecode(name), mode,
                                     _caller(ctx))
        handle.direct = bool(flags & os.O_DIRECT)
        info = pyfuse3.FileInfo(fh=self._new_fh(self._files, handle), keep_cache=True)
        return info, self._attrs(handle.inode)

    @_errno_boundary
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        handle = self._file(fh)
        if handle.strict_atime and not self.overlay.mounted_read_only:
            handle.accessed()
            _drop_cached_attrs(InodeT(handle.inode.number))  # stat shows the new access time
        view = self._read_buffer(size)
        n = handle.read_cached(off, view)
        if n is None and size <= INLINE_READ_MAX:
            n = handle.read_local(off, view)
        if n is not None:
            # pyfuse3 replies with any buffer, before another request can run (there is no
            # await in between), so one buffer serves every inline read without a copy.
            return cast(bytes, view[:n])
        return await self._in_thread(handle.read, off, size)

    @_errno_boundary
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        handle = self._file(fh)
        # A write through an O_DIRECT descriptor runs inline, whatever it costs (a partly
        # copied-up file copies blocks in): every request that came after it is served after it.
        # The kernel drops the range's cached pages before a direct write and, once it is
        # answered, after it too, unless it completes asynchronously (io_submit), which cowfs
        # turns off where pyfuse3 can (completes_direct_writes): a buffered read that raced
        # the write would otherwise keep the old bytes cached.
        if handle.direct or (len(buf) <= INLINE_WRITE_MAX and not handle.writes_sync
                             and not handle.combined):
            return handle.write(off, buf)
        return await self._in_thread(handle.write, off, buf)

    async def flush(self, fh: FileHandleT) -> None:
        """ENOSYS, so that the kernel sends no more FLUSH (one request fewer per ``close``).

        Nothing is buffered here: writes go straight to the real file, and a partial file's
        map is recorded by the write that grows it (:meth:`PartialData.write`), which reports a
        failure to record it. With the writeback cache, the kernel still writes a file's dirty
        pages back at ``close`` and reports their failure there."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errno_boundary
    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        await self._in_thread(self._file(fh).fsync, datasync)

    def _file_calls_on(self) -> None:
        if not self.file_calls:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # as a stock pyfuse3 (libfuse) answers

    @_errno_boundary
    async def fallocate(self, fh: FileHandleT, mode: int, offset: int, length: int) -> None:
        self._file_calls_on()
        # In a thread: allocating or zeroing a large range waits for the disk.
        await self._in_thread(self._file(fh).fallocate, mode, offset, length)

    @_errno_boundary
    async def lseek(self, fh: FileHandleT, offset: int, whence: int) -> int:
        self._file_calls_on()
        return self._file(fh).seek(offset, whence)

    @_errno_boundary
    async def ioctl(self, inode: InodeT, fh: FileHandleT, cmd: int, flags: int, in_buf: bytes,
                    out_size: int, ctx: pyfuse3.RequestContext) -> bytes:
        """The kernel's fileattr_get/set (chattr, lsattr); every other ioctl fails ENOTTY."""
        self._file_calls_on()
        node = self._inode(inode)
        if cmd in fileattr.SET_SIZES:
            # It copies the object up.
            await self._short(self.overlay.set_fileattr, node, cmd, in_buf)
            # The ctime changed, and the kernel keeps its cached attributes after an ioctl.
            _drop_cached_attrs(inode)
            return b""
        handle = None if flags & FUSE_IOCTL_DIR else self._files.get(fh)
        return self.overlay.get_fileattr(node, handle, cmd, out_size)

    @_errno_boundary
    async def release(self, fh: FileHandleT) -> None:
        handle = self._files.pop(fh)
        try:
            if handle.unrecorded:  # a truncation whose record failed (see handles.record)
                await self._in_thread(handle.record)
        finally:
            handle.close()

    # --- directories --------------------------------------------------------------------------

    @_errno_boundary
    async def opendir(self, inode: InodeT,
                      ctx: pyfuse3.RequestContext) -> FileHandleT | pyfuse3.FileInfo:
        handle = self.overlay.opendir(self._inode(inode))
        if self.kernel_opens_dirs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fh = self._new_fh(self._dirs, handle)
        if not self.cache_listings:
            return fh
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, cache_readdir=True)

    @_errno_boundary
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if fh == 0 and self.kernel_opens_dirs:
            directory = self._inode(token.inode)
            snapshot, names = self._snapshots.names(directory, start_id, self.overlay.listing)
            self._snapshots.reached(
                snapshot, self._readdir_entries(directory, start_id, names, token))
        else:
            handle = self._dir(fh)
            names = handle.snapshot(start_id, self.overlay.listing)
            self._readdir_entries(handle.inode, start_id, names, token)

    def _readdir_entries(self, directory: Inode, start: int, names: Listing,
                         token: pyfuse3.ReaddirToken) -> int:
        """Reply with the entries from index ``start`` on, as many as fit; the entry at index
        ``i`` has the offset ``i + 1``. Returns the offset where the reply ended."""
        if not getattr(token, "plus", True):
            return self._readdir_plain(directory, start, names, token)
        replied = start
        misses = 0  # entries in a row not held by the kernel (see _HELD_MISSES)
        for index in range(start, len(names)):
            name = names[index]
            if name in (".", ".."):
                # The kernel ignores the attributes of these and counts no lookup for them.
                target = directory if name == "." else self.overlay.dotdot(directory)
                if not pyfuse3.readdir_reply(token, FileNameT(os.fsencode(name)),
                                             self._attrs(target), index + 1):
                    return replied
                replied = index + 1
                continue
            if misses < _HELD_MISSES:
                held = self.overlay.held_listed(names, directory, name)
                entry = None if held is None else self._held_entry(held)
                if entry is not None:
                    misses = 0
                    if not pyfuse3.readdir_reply(token, FileNameT(os.fsencode(name)), entry,
                                                 index + 1):
                        return replied
                    replied = index + 1
                    continue
                misses += 1
            try:
                found = self.overlay.lookup_stat(directory, name)
            except OSError as e:
                # One bad entry (a refused redirect) must not make the directory unlistable: list
                # it without attributes, as the kernel lists it; its own lookup then fails.
                log.debug("readdir: listing %r without attributes: %s", name, e)
                unlooked = self._unlooked(directory, name)
                if unlooked is not None and not pyfuse3.readdir_reply(
                        token, FileNameT(os.fsencode(name)), unlooked, index + 1):
                    return replied
                replied = index + 1
                continue
            if found is None:
                continue  # gone since the snapshot
            child = found[0]
            if not pyfuse3.readdir_reply(token, FileNameT(os.fsencode(name)),
                                         self._attrs(*found), index + 1):
                self.overlay.forget(child.number, 1)
                return replied
            replied = index + 1
        return replied

    def _readdir_plain(self, directory: Inode, start: int, names: Listing,
                       token: pyfuse3.ReaddirToken) -> int:
        """A listing without attributes: names, types and inode numbers only, and no lookups
        counted. Most entries cost one ``fstatat`` (:func:`cowfs.daemon.readdir.plain_entry`)."""
        replied = start
        for index in range(start, len(names)):
            name = names[index]
            if name in (".", ".."):
                target = directory if name == "." else self.overlay.dotdot(directory)
                found: tuple[int, int] | None = (stat.S_IFDIR, target.number)
            else:
                try:
                    found = self.overlay.listed_plain(names, directory, name)
                except OSError:
                    found = self.overlay.unresolved_entry(directory, name)  # listed, as above
            if found is None:
                continue
            entry = pyfuse3.EntryAttributes()
            entry.st_mode = ModeT(found[0])
            entry.st_ino = InodeT(found[1])
            if not pyfuse3.readdir_reply(token, FileNameT(os.fsencode(name)), entry, index + 1):
                return replied
            replied = index + 1
        return replied

    @staticmethod
    def _held_entry(held: Held) -> pyfuse3.EntryAttributes | None:
        """A readdirplus entry for an object the kernel holds under the name already: its
        number and type, and node id 0, with which the kernel links nothing and counts no
        lookup, and keeps the dentry and attributes it has (which cowfs keeps up to date). None
        where node id 0 cannot be given (:func:`_clear_node_id`)."""
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = InodeT(held.number)
        entry.st_mode = ModeT(held.kind)
        return entry if _clear_node_id(entry) else None

    def _unlooked(self, directory: Inode, name: str) -> pyfuse3.EntryAttributes | None:
        """A readdirplus entry for a name whose lookup failed: listed, but with no inode.

        Node id 0 tells the kernel to link nothing (and count no lookup); it lists the name with
        the entry's own ``d_ino`` and type, and looks the name up (which fails again) only when
        it is used, as the kernel's overlayfs does. pyfuse3 sets the node id and ``d_ino`` from
        one field, and glibc skips entries whose ``d_ino`` is 0, so :func:`_clear_node_id` sets
        the node id alone. None where that is not possible: the entry is then left out.
        """
        kind, number = self.overlay.unresolved_entry(directory, name)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = InodeT(number)
        entry.st_mode = ModeT(kind)
        return entry if _clear_node_id(entry) else None

    @_errno_boundary
    async def releasedir(self, fh: FileHandleT) -> None:
        if self._dirs.pop(fh, None) is None:
            raise pyfuse3.FUSEError(errno.EBADF)

    @_errno_boundary
    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        if fh == 0 and self.kernel_opens_dirs:
            # Which directory is not said (the kernel opened it): make the whole upper durable.
            await self._in_thread(self.overlay.sync_upper)
            return
        await self._in_thread(self.overlay.fsyncdir, self._dir(fh).inode)

    # --- xattrs -------------------------------------------------------------------------------

    @_errno_boundary
    async def getxattr(self, inode: InodeT, name: XAttrNameT,
                       ctx: pyfuse3.RequestContext) -> bytes:
        value = self.overlay.getxattr(self._inode(inode), os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @_errno_boundary
    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> Sequence[XAttrNameT]:
        return [XAttrNameT(os.fsencode(n)) for n in self.overlay.listxattr(self._inode(inode))]

    @_errno_boundary
    async def setxattr(self, inode: InodeT, name: XAttrNameT, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self._in_thread(self.overlay.setxattr, self._inode(inode), os.fsdecode(name), value)
        self._acl_changed_mode(inode, name)

    @_errno_boundary
    async def removexattr(self, inode: InodeT, name: XAttrNameT,
                          ctx: pyfuse3.RequestContext) -> None:
        await self._in_thread(self.overlay.removexattr, self._inode(inode), os.fsdecode(name))
        self._acl_changed_mode(inode, name)

    @staticmethod
    def _acl_changed_mode(inode: InodeT, name: XAttrNameT) -> None:
        """Setting an access ACL changes the mode bits (``cp -a`` and ``setfacl`` set modes so),
        but the kernel keeps its cached attributes after a setxattr: drop them."""
        if name == b"system.posix_acl_access":
            _drop_cached_attrs(inode)
