"""The one walk of an upper layer against its lower layers, yielding typed change records.

Every offline tool is a consumer of :func:`walk`: ``diff`` prints the records, ``commit`` turns them
into a plan for a base directory, ``export`` into an OCI layer, ``status`` counts them and ``check``
looks at the :class:`Anomaly` records. The walk never writes anything.

The upper is walked depth-first, names sorted, parents before children. Each upper object is
compared with what the lower layers show at the same place (resolved with the same rule as a
lookup through the mount: whiteouts hide, a non-directory hides everything below it, directories
merge until one is opaque, and a directory's ``overlay.redirect`` sends the lookup in the layers
below it to another path). Objects that are only in the lowers are never visited: they did not
change.

What the layers show at a place is looked up with :mod:`cowfs.core.resolve`, the mount's own lookup,
on layers opened read-only (no lock, no work directory); objects are reached by ``O_PATH``
descriptors relative to their parent, never following a symlink. The walk does not recurse and holds
a bounded number of descriptors at any depth (:mod:`cowfs.core.dirstack`).

Known limits:

* a regular file whose size did not change is compared byte by byte with its lower copy to tell a
  data change from a metadata-only one; for large files this reads both copies;
* directory times are not compared (creating or removing a child changes them, and copy-up of a
  child does not), so a directory is reported as modified only for its mode, owner or xattrs;
* symlink times are not compared either (copy-up does not keep them on every filesystem);
* cowfs's metacopy files (``user.overlay.metacopy``: data still in a lower file) are compared by
  the lower file their origin names; the kernel's ``trusted.overlay.metacopy`` is not understood;
* a redirect that the lookup refuses is reported (:attr:`Problem.BAD_REDIRECT`); the directory
  that holds it is then walked as if opaque (as ``cowfs check --repair`` leaves it), though the
  mount answers ``EIO`` there; under a :class:`Renamed` directory, :func:`merged_tree` fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import stat
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import BinaryIO, TypeVar

from ..core import metacopy, partial, realfs, resolve, schema, upperinfo
from ..core.dirstack import DirStack, depth_first, join, tree
from ..core.errors import CowfsError
from ..core.layers import Layer, holds_metacopy
from ..core.resolve import Found, Real, merge_names

_CHUNK = 1 << 20


class Kind(Enum):
    """What kind of object a record is about."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"
    SOCKET = "socket"
    CHAR = "char"
    BLOCK = "block"


_KINDS = {
    stat.S_IFREG: Kind.FILE,
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFSOCK: Kind.SOCKET,
    stat.S_IFCHR: Kind.CHAR,
    stat.S_IFBLK: Kind.BLOCK,
}


def kind_of(mode: int) -> Kind:
    return _KINDS[stat.S_IFMT(mode)]


# --- the records ---------------------------------------------------------------------------------
# ``path`` is relative to the layer root, '/'-separated, without a leading slash; the root is ".".


@dataclass(frozen=True, slots=True)
class Added:
    """A new object: nothing was visible at ``path`` in the lowers."""

    path: str
    kind: Kind
    #: For a second (third, ...) name of the same upper inode: the first name the walk met.
    hardlink_of: str | None = None


@dataclass(frozen=True, slots=True)
class Modified:
    """An upper object over a lower one of the same kind whose content or attributes differ."""

    path: str
    kind: Kind
    #: True when the content changed (file data, symlink target, device number); False when only
    #: mode, owner, times or xattrs did.
    data: bool
    hardlink_of: str | None = None
    #: Set for a name that the upper does not hold but the mount serves from the hard-link index
    #: (another name of the same lower inode was copied up): the index entry's name in
    #: ``WORK/index``, where the object's data and attributes are.
    via_index: str | None = None


@dataclass(frozen=True, slots=True)
class Unchanged:
    """A copied-up object identical to its lower copy (e.g. opened for writing, nothing written)."""

    path: str
    kind: Kind
    hardlink_of: str | None = None
    via_index: str | None = None


@dataclass(frozen=True, slots=True)
class Deleted:
    """A whiteout over an object the lowers show; ``kind`` is the kind of what it hides."""

    path: str
    kind: Kind


@dataclass(frozen=True, slots=True)
class Replaced:
    """An upper object that hides the lower one at ``path`` entirely: an opaque directory over a
    lower directory (whose children all disappear), or a change of kind (``was``)."""

    path: str
    kind: Kind
    was: Kind


@dataclass(frozen=True, slots=True)
class Renamed:
    """A directory whose lower content comes from ``source`` (``overlay.redirect``)."""

    path: str
    source: str
    #: Mode, owner or xattrs differ from the source directory's.
    metadata: bool = False


class Problem(Enum):
    """Something in the upper that is not as cowfs writes it (see :mod:`cowfs.tools.check`)."""

    STRAY_WHITEOUT = "whiteout over nothing"
    UNMARKED_WHITEOUT = "whiteout in a directory not marked overlay.opaque=x (shown as a file)"
    WHITEOUT_IN_OPAQUE = "whiteout in an opaque directory (shown as a file)"
    BAD_REDIRECT = "malformed or escaping redirect"
    MISSING_REDIRECT = "redirect to a directory the lowers do not have"
    METACOPY_NO_DATA = "metacopy file whose data the lowers do not have (reads fail)"


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A flaw of the layer itself; no effect on the other records (the walk goes on as the mount
    would show it)."""

    path: str
    problem: Problem
    detail: str = ""


Change = Added | Modified | Unchanged | Deleted | Replaced | Renamed | Anomaly


def redirect_source(path: str, redirect: schema.Redirect) -> str:
    """The path (from the layer root) whose lower content a directory at ``path`` with
    ``redirect`` shows."""
    if redirect.absolute:
        return "/".join(redirect.components)
    return join(posixpath.dirname(path) or ".", redirect.components[0])


# --- the layers, opened read-only ----------------------------------------------------------------


def _open_root(path: Path, role: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CowfsError(f"{role} directory {str(path)!r} does not exist") from None
    except NotADirectoryError:
        raise CowfsError(f"{role} {str(path)!r} is not a directory") from None
    except OSError as e:
        raise CowfsError(f"cannot read {role} directory {str(path)!r}: {e.strerror}") from None


class Stack:
    """The layers and their roots, for :mod:`cowfs.core.resolve`; owns every descriptor the walk
    holds.

    Also what the offline tools read a file's data through (:meth:`open_data`).
    Not :func:`cowfs.core.layers.open_stack`: that locks the upper and creates the work directory,
    and the offline tools must not write.
    """

    def __init__(self, upper: Path, lowers: Sequence[Path]) -> None:
        self._fds: list[int] = []
        paths = (upper, *lowers)
        try:
            layers = []
            for index, path in enumerate(paths):
                fd = self.keep(_open_root(path, "upper" if index == 0 else "lower"))
                layers.append(Layer(index, path, fd, os.fstat(fd).st_dev,
                                    is_bottom=0 < index == len(paths) - 1,
                                    cowfs_upper=index > 0 and holds_metacopy(fd)))
            roots = []
            for layer in layers:
                roots.append(resolve.root_real(layer))
                self.keep(roots[-1].fd)
            self.roots = tuple(roots)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.release(0)

    def keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def mark(self) -> int:
        """A point to :meth:`release` back to: the walk is depth-first, so descriptors opened
        for one entry (and everything below it) are closed when that entry is done."""
        return len(self._fds)

    def release(self, mark: int) -> None:
        for fd in self.detach(mark):
            os.close(fd)

    def detach(self, mark: int) -> list[int]:
        """The descriptors kept since ``mark``, handed to the caller (who closes them)."""
        taken = self._fds[mark:]
        del self._fds[mark:]
        return taken

    def probe(self, parent: Real, name: str) -> resolve.Probe[Real]:
        """``name`` in one layer's directory, whiteouts included (see :func:`resolve.probe`)."""
        found = resolve.probe(parent, name)
        if isinstance(found, Found):
            self.keep(found.obj.fd)
        return found

    def data(self, real: Real) -> Real:
        """The lower file holding the data of a metacopy file of any layer (``real``)
        (:class:`metacopy.NoDataError` when there is none)."""
        found = self._find_data(real.fd, real.layer.index)
        self.keep(found.fd)
        return found

    def open_data(self, fd: int, layer: int = 0) -> BinaryIO:
        """The content of the object ``fd`` (``O_PATH``) of layer ``layer`` (the upper's by
        default), to read: a metacopy file's is its data file's, a partial file's its own blocks
        and the rest of its lower file's. The caller closes it."""
        if not (stat.S_ISREG(os.fstat(fd).st_mode) and self.roots[layer].layer.reads_metacopy
                and metacopy.is_marked(fd)):
            return os.fdopen(realfs.reopen(fd, os.O_RDONLY), "rb")
        found = self._find_data(fd, layer)
        try:
            dmap = _data_map(fd)
            if dmap is not None:
                return partial.open_content(fd, found.fd, dmap)
            return os.fdopen(realfs.reopen(found.fd, os.O_RDONLY), "rb")
        finally:
            os.close(found.fd)

    def _find_data(self, fd: int, layer: int) -> Real:
        """:func:`metacopy.find_data` for a marked file of layer ``layer``, whose root's owner
        is the one trusted there."""
        return metacopy.find_data(fd, self.roots, os.fstat(self.roots[layer].fd).st_uid,
                                  layer_index=layer)

    def resolve(self, parents: tuple[Real, ...], name: str) -> tuple[Real, ...]:
        """The real objects behind ``name`` in a merged directory of ``parents`` (topmost first),
        as the mount shows them; may raise :class:`resolve.InvalidRedirectError`."""
        if not parents:
            return ()
        taken = resolve.resolve(parents, self.roots, name)
        for real in taken:
            self.keep(real.fd)
        return taken


@dataclass(frozen=True, slots=True)
class _Below:
    """What the lowers show at one path."""

    #: The objects the mount merges there, topmost first; empty when nothing is there.
    reals: tuple[Real, ...] = ()
    #: Why what is there cannot be merged (a redirect the lookup refuses). The lookup refuses
    #: one only on a directory, after taking nothing but directories: so it is a directory.
    refused: str | None = None

    @property
    def kind(self) -> Kind | None:
        if self.refused is not None:
            return Kind.DIR
        return kind_of(self.reals[0].mode) if self.reals else None


# --- comparing an upper object with its lower copy -----------------------------------------------


def visible_xattrs(fd: int) -> dict[str, bytes]:
    """A real object's xattrs as users see them through the mount (layer metadata left out)."""
    found: dict[str, bytes] = {}
    for stored in realfs.listxattr(fd):
        name = schema.unescape_xattr(stored)
        if name is None:
            continue
        with contextlib.suppress(OSError):
            value = realfs.getxattr(fd, stored)
            if value is not None:
                found[name] = value
    return found


def _data_map(fd: int) -> partial.DataMap | None:
    """A marked file's data map (None: a metacopy file); a malformed one leaves it without
    data (find_data refuses it first)."""
    try:
        return partial.read_map(fd)
    except ValueError as e:
        raise metacopy.NoDataError(f"its data map is malformed: {e}") from None


def _same_data(upper: Real, lower: Real, data: Real | None = None) -> bool:
    """``data``: where a metacopy upper file's data is (a lower file). Not for partial files
    (:meth:`_Walker._same_as_lower` compares their content)."""
    if data is not None:
        if _same_inode(data, lower):
            return True
        upper = data
    kind = kind_of(upper.mode)
    if kind is Kind.SYMLINK:
        return realfs.readlink(upper.fd) == realfs.readlink(lower.fd)
    a, b = upper.stat(), lower.stat()
    if kind in (Kind.CHAR, Kind.BLOCK):
        return a.st_rdev == b.st_rdev
    if kind is not Kind.FILE:
        return True
    if a.st_size != b.st_size:
        return False
    x = realfs.reopen(upper.fd, os.O_RDONLY)
    try:
        y = realfs.reopen(lower.fd, os.O_RDONLY)
        try:
            while True:
                chunk = os.read(x, _CHUNK)
                if chunk != os.read(y, _CHUNK):
                    return False
                if not chunk:
                    return True
        finally:
            os.close(y)
    finally:
        os.close(x)


def _same_stream(x: BinaryIO, y: BinaryIO) -> bool:
    while True:
        chunk = x.read(_CHUNK)
        if chunk != y.read(_CHUNK):
            return False
        if not chunk:
            return True


def _same_inode(a: Real, b: Real) -> bool:
    x, y = a.stat(), b.stat()
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


def _same_metadata(upper: Real, lower: Real) -> bool:
    a, b = upper.stat(), lower.stat()
    if (stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid) != (stat.S_IMODE(b.st_mode), b.st_uid,
                                                          b.st_gid):
        return False
    if kind_of(upper.mode) not in (Kind.DIR, Kind.SYMLINK) and a.st_mtime_ns != b.st_mtime_ns:
        return False
    return visible_xattrs(upper.fd) == visible_xattrs(lower.fd)


def _is_xattr_whiteout(real: Real) -> bool:
    """Whether an object that the lookup shows carries the whiteout xattr all the same."""
    st = real.stat()
    return schema.may_be_xattr_whiteout(st.st_mode, st.st_size) and resolve.has_whiteout_xattr(
        real.fd, real.layer)


# --- the walk ------------------------------------------------------------------------------------


def walk(upper: Path, lowers: Sequence[Path], work: Path | None = None) -> Iterator[Change]:
    """Every change the upper makes to what the lowers (topmost first) show. ``work`` is the
    work directory (default: the upper's own), whose hard-link index serves some names.
    Refuses an upper written by a cowfs with another layer format."""
    stack = Stack(upper, lowers)
    try:
        upperinfo.upper_format(stack.roots[0].fd, upper)
        walker = _Walker(stack)
        yield from walker.run()
        index_fd = _open_index(stack.roots[0].fd, upper, work)
        if index_fd is not None:
            try:
                yield from walker.indexed(index_fd)
            finally:
                os.close(index_fd)
    finally:
        stack.close()


class _Walker:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.links: dict[tuple[int, int], str] = {}
        #: Upper paths seen by the walk, so that index-served names are not reported twice.
        self.seen: set[str] = set()

    def run(self) -> Iterator[Change]:
        root, *lowers = self.stack.roots
        if lowers and not _same_metadata(root, lowers[0]):
            yield Modified(".", Kind.DIR, data=False)
        yield from _depth_first(self.stack, _Frame(root, tuple(lowers)),
                                lambda frame: realfs.list_names(frame.top.fd), self._entry)

    def _below(self, lowers: tuple[Real, ...], name: str) -> _Below:
        try:
            return _Below(self.stack.resolve(lowers, name))
        except resolve.InvalidRedirectError as e:
            return _Below(refused=e.reason)

    def _entry(self, path: str, name: str,
               frame: _Frame) -> tuple[list[Change], _Frame | None]:
        """The records of ``name`` in the upper directory of ``frame``, and for a directory
        what to walk below it."""
        parent, lowers = frame.top, frame.below
        try:
            found = self.stack.probe(parent, name)
        except resolve.InvalidRedirectError as e:
            return ([Anomaly(path, Problem.BAD_REDIRECT, e.reason), Added(path, Kind.DIR)],
                    self._refused_dir(name, parent))
        if found is None:
            return [], None  # removed while we looked: the walk describes a layer at rest
        if not isinstance(found, Found):
            kind = self._below(lowers, name).kind
            return [Deleted(path, kind) if kind is not None
                    else Anomaly(path, Problem.STRAY_WHITEOUT)], None
        real = found.obj
        if real.is_dir:
            records, below = self._dir_records(path, name, parent, real, lowers)
            return records, _Frame(real, below)
        records = []
        if _is_xattr_whiteout(real):
            records.append(Anomaly(path, Problem.WHITEOUT_IN_OPAQUE if parent.opaque
                                   else Problem.UNMARKED_WHITEOUT))
        data = None
        if real.metacopy:
            try:
                data = self.stack.data(real)
            except metacopy.NoDataError as e:
                records.append(Anomaly(path, Problem.METACOPY_NO_DATA, e.reason))
        records.append(self._nondir(path, real, self._below(lowers, name), data))
        return records, None

    def _refused_dir(self, name: str, parent: Real) -> _Frame | None:
        """An upper directory whose own redirect the lookup refuses: its content alone."""
        fd = realfs.open_path(parent.fd, name)
        if fd is None:
            return None
        self.stack.keep(fd)
        return _Frame(Real(parent.layer, fd, os.fstat(fd).st_mode,
                           resolve.read_dir_mark(fd, parent.layer)), ())

    def _dir_records(self, path: str, name: str, parent: Real, real: Real,
                     lowers: tuple[Real, ...]) -> tuple[list[Change], tuple[Real, ...]]:
        """An upper directory's records, and the lower directories merged into it."""
        if real.redirect is not None and not real.opaque:
            return self._renamed(path, name, parent, real.redirect, lowers)
        at = self._below(lowers, name)
        if real.opaque:
            return [Added(path, Kind.DIR) if at.kind is None
                    else Replaced(path, Kind.DIR, at.kind)], ()
        if at.refused is not None:
            return [Anomaly(path, Problem.BAD_REDIRECT, at.refused),
                    Replaced(path, Kind.DIR, Kind.DIR)], ()
        if not at.reals:
            return [Added(path, Kind.DIR)], ()
        top = at.reals[0]
        if not top.is_dir:
            return [Replaced(path, Kind.DIR, kind_of(top.mode))], ()
        if _same_metadata(real, top):
            return [], at.reals
        return [Modified(path, Kind.DIR, data=False)], at.reals

    def _renamed(self, path: str, name: str, parent: Real, redirect: schema.Redirect,
                 lowers: tuple[Real, ...]) -> tuple[list[Change], tuple[Real, ...]]:
        """A directory whose lower content comes from elsewhere: looked up as the mount does,
        through the upper directory itself, whose redirect the lookup follows."""
        source = redirect_source(path, redirect)
        try:
            merged = self.stack.resolve((parent, *lowers), name)
        except resolve.InvalidRedirectError as e:
            return [Anomaly(path, Problem.BAD_REDIRECT, e.reason), Added(path, Kind.DIR)], ()
        below = merged[1:]  # only directories are merged below a directory
        if not below:
            return [Anomaly(path, Problem.MISSING_REDIRECT, source), Added(path, Kind.DIR)], ()
        return [Renamed(path, source, not _same_metadata(merged[0], below[0]))], below

    def _link(self, path: str, st: os.stat_result) -> str | None:
        """For a further name of an inode that the walk met before: the first name."""
        first = self.links.setdefault((st.st_dev, st.st_ino), path)
        return first if first != path else None

    def _nondir(self, path: str, real: Real, below: _Below, data: Real | None = None) -> Change:
        self.seen.add(path)
        link = self._link(path, real.stat()) if real.nlink > 1 else None
        kind = kind_of(real.mode)
        if below.kind is None:
            return Added(path, kind, link)
        if below.kind is not kind:
            return Replaced(path, kind, below.kind)
        lower = below.reals[0]
        if not self._same_as_lower(real, lower, data):
            return Modified(path, kind, True, link)
        if not _same_metadata(real, lower):
            return Modified(path, kind, False, link)
        return Unchanged(path, kind, link)

    def _same_as_lower(self, real: Real, lower: Real, data: Real | None = None) -> bool:
        """Whether an upper object has the data of the lower one the lowers show there (``data``:
        where a metacopy upper file's data is). A partial file, upper or lower (an older
        upper's), is compared by content: its own blocks and the rest of its data file's."""
        if not (real.partial or lower.partial):
            return _same_data(real, self._lower_data(lower), data)
        if real.stat().st_size != lower.stat().st_size:
            return False
        try:
            mine = self.stack.open_data(real.fd, real.layer.index)
        except metacopy.NoDataError:
            return False
        with mine:
            try:
                theirs = self.stack.open_data(lower.fd, lower.layer.index)
            except metacopy.NoDataError:
                return False
            with theirs:
                return _same_stream(mine, theirs)

    def _lower_data(self, lower: Real) -> Real:
        """Where a lower object's data is: a lower metacopy file's is its data file's (one it
        has none of is compared as it is: the mount fails to read it)."""
        if not lower.metacopy:
            return lower
        try:
            return self.stack.data(lower)
        except metacopy.NoDataError:
            return lower

    # --- names served from the hard-link index --------------------------------------------------

    def indexed(self, index_fd: int) -> Iterator[Change]:
        """Records for the lower names of copied-up hard-linked inodes that the upper does not
        hold: the mount serves them from the index entry (``WORK/index/<layer>-<ino>``, open at
        ``index_fd``).

        Known limit: finding those names needs a scan of the lower layers for hard-linked files;
        it is done only when the index has entries.
        """
        entries = set(os.listdir(index_fd))
        if not entries:
            return
        for path, entry in self._indexed_names(entries):
            mark = self.stack.mark()
            try:
                record = self._indexed(path, entry, index_fd)
                if record is not None:
                    yield record
            finally:
                self.stack.release(mark)

    def _indexed_names(self, entries: set[str]) -> list[tuple[str, str]]:
        found = []
        for root in self.stack.roots[1:]:
            for path, st in _hard_linked_files(root.fd):
                entry = schema.index_name(root.layer.index, st.st_ino)
                if entry in entries and path not in self.seen:
                    found.append((path, entry))
        return sorted(set(found))

    def _indexed(self, path: str, entry: str, index_fd: int) -> Change | None:
        """The record for ``path`` if the merged view shows the indexed lower inode there."""
        reals = self.stack.roots
        for name in path.split("/"):
            try:
                reals = self.stack.resolve(reals, name)
            except resolve.InvalidRedirectError:
                return None  # the mount answers EIO there: it shows no index entry
            if not reals:
                return None
        top = reals[0]
        if top.layer.is_upper or top.is_dir or \
                schema.index_name(top.layer.index, top.stat().st_ino) != entry:
            return None
        fd = realfs.open_path(index_fd, entry)
        if fd is None:
            return None
        st = os.fstat(self.stack.keep(fd))
        copy = Real(self.stack.roots[0].layer, fd, st.st_mode)
        kind = kind_of(st.st_mode)
        link = self._link(path, st)
        if not self._same_as_lower(copy, top):
            return Modified(path, kind, True, link, entry)
        if not _same_metadata(copy, top):
            return Modified(path, kind, False, link, entry)
        return Unchanged(path, kind, link, entry)


def _open_index(upper_fd: int, upper: Path, work: Path | None) -> int | None:
    """``WORK/index`` (None when there is none), never through a symlink at its name: the
    default work directory is reached from the upper's descriptor, so that a symlink planted at
    ``UPPER/.cowfs-work`` names no index elsewhere; a given ``work`` is the caller's (checked by
    :func:`cowfs.core.upperinfo.recorded_work`, or a running mount's)."""
    try:
        if work is None or work == schema.default_work_dir(upper):
            work_fd = os.open(schema.WORK_DIR_NAME, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW |
                              os.O_CLOEXEC, dir_fd=upper_fd)
        else:
            work_fd = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.open(schema.WORK_INDEX_NAME, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                       os.O_CLOEXEC, dir_fd=work_fd)
    except OSError:
        return None
    finally:
        os.close(work_fd)


def _hard_linked_files(root_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    """Regular files with several names under a layer root, by path (no symlink followed)."""
    for path, st in tree(root_fd, skip=lambda path: resolve.is_hidden_name(True, path)):
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            yield path, st


# --- the merged view, read offline ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Visible:
    """One object of the merged view under a directory (see :func:`merged_tree`). ``fd`` is an
    ``O_PATH`` descriptor of the real object that serves it, valid until the iteration moves on."""

    path: str
    fd: int
    st: os.stat_result
    #: 0 for the upper, 1... for the lowers (topmost first).
    layer: int


def merged_tree(upper: Path, lowers: Sequence[Path], path: str) -> Iterator[Visible]:
    """Every object the overlay shows at and under ``path`` (a directory), parents first, names
    sorted: what a mount would show there, computed from the layers alone."""
    stack = Stack(upper, lowers)
    try:
        reals = stack.roots
        if path != ".":
            for name in path.split("/"):
                reals = stack.resolve(reals, name)
                if not reals or not reals[0].is_dir:
                    raise CowfsError(f"{path!r} is not a directory of the merged view")
        yield from _merged_children(stack, path, reals)
    except resolve.InvalidRedirectError as e:
        raise CowfsError(f"cannot read {path!r} of the merged view: a layer has a redirect "
                         f"that the mount refuses ({e.reason})") from None
    finally:
        stack.close()


def _merged_children(stack: Stack, path: str, reals: tuple[Real, ...]) -> Iterator[Visible]:
    def entry(child: str, name: str, frame: _Frame) -> tuple[list[Visible], _Frame | None]:
        taken = stack.resolve((frame.top, *frame.below), name)
        if not taken:
            return [], None
        top = taken[0]
        return ([Visible(child, top.fd, top.stat(), top.layer.index)],
                _Frame(top, taken[1:]) if top.is_dir else None)

    def names(frame: _Frame) -> Iterable[str]:
        return merge_names(realfs.list_names(real.fd) for real in (frame.top, *frame.below))

    yield from _depth_first(stack, _Frame(reals[0], reals[1:]), names, entry, top=path)


# --- walking a tree of any depth -----------------------------------------------------------------


@dataclass(slots=True)
class _Frame:
    """A directory of a walk: the real directory there (the upper's, or the topmost one) and
    the directories merged below it, with the descriptors opened for them."""

    top: Real
    below: tuple[Real, ...]
    fds: list[int] = field(default_factory=list)


def _close_frame(frame: _Frame) -> None:
    for fd in frame.fds:
        os.close(fd)
    frame.fds = []


def _frame_identity(frame: _Frame) -> tuple[int, int]:
    st = os.fstat(frame.top.fd)
    return st.st_dev, st.st_ino


_R = TypeVar("_R")


def _depth_first(stack: Stack, root: _Frame, names: Callable[[_Frame], Iterable[str]],
                 entry: Callable[[str, str, _Frame], tuple[Sequence[_R], _Frame | None]],
                 top: str = ".") -> Iterator[_R]:
    """Walk below ``root`` (at path ``top``), depth-first, names sorted, parents before
    children, without recursion and with a bounded number of descriptors
    (:mod:`cowfs.core.dirstack`). ``entry(path, name, parent)`` gives a name's records and, for a
    directory to walk, its frame; the records are yielded while the descriptors opened for them are
    held. A directory whose descriptors were closed is opened again through ``entry`` (its records
    then unused)."""

    def reopen(parent: _Frame, name: str) -> _Frame:
        mark = stack.mark()
        try:
            child = entry(name, name, parent)[1]
            if child is None:
                raise NotADirectoryError(errno.ENOTDIR, "no longer a directory")
            child.fds = stack.detach(mark)
            return child
        finally:
            stack.release(mark)

    def todo(path: str, frame: _Frame) -> list[str]:
        return sorted((name for name in names(frame)
                       if not resolve.is_hidden_name(path == ".", name)), reverse=True)

    def visit(path: str, name: str, parent: _Frame) -> Generator[_R, None, _Frame | None]:
        mark = stack.mark()
        child: _Frame | None = None
        try:
            records, child = entry(path, name, parent)
            if child is not None:
                child.fds = stack.detach(mark)
            yield from records
        except BaseException:
            if child is not None:
                _close_frame(child)
            raise
        finally:
            stack.release(mark)
        return child

    frames = DirStack(root, reopen=reopen, close=_close_frame, identity=_frame_identity)
    yield from depth_first(frames, todo, visit, top)
