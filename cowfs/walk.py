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

The layer format is read only through :mod:`cowfs.schema` (names and the interpretation of values);
objects are reached by ``O_PATH`` descriptors relative to their parent, never following a symlink.

Known limits:

* a regular file whose size did not change is compared byte by byte with its lower copy to tell a
  data change from a metadata-only one; for large files this reads both copies;
* directory times are not compared (creating or removing a child changes them, and copy-up of a
  child does not), so a directory is reported as modified only for its mode, owner or xattrs;
* symlink times are not compared either (copy-up does not keep them on every filesystem);
* the kernel's ``metacopy`` upper files (data still in a lower) are not understood.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from . import realfs, schema
from .errors import CowfsError

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
    NONDIR_REDIRECT = "redirect on something that is not a directory"


@dataclass(frozen=True, slots=True)
class Anomaly:
    """A flaw of the layer itself; no effect on the other records (the walk goes on as the mount
    would show it)."""

    path: str
    problem: Problem
    detail: str = ""


Change = Added | Modified | Unchanged | Deleted | Replaced | Renamed | Anomaly


def join(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


# --- real objects of the layers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Real:
    """One real object of one layer, held by an ``O_PATH`` descriptor."""

    layer: int  # 0: the upper; 1...: the lowers, topmost first
    fd: int
    st: os.stat_result
    mark: schema.DirMark = schema.DirMark.PLAIN
    redirect: bytes | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st.st_mode)

    @property
    def kind(self) -> Kind:
        return kind_of(self.st.st_mode)


class _WhiteoutT:
    pass


_WHITEOUT = _WhiteoutT()


@dataclass(frozen=True, slots=True)
class _Target:
    """Where the layers below a redirected directory look it up: an absolute path from the layer
    root, or another name in the same parent."""

    path: str
    absolute: bool


def parse_redirect(value: bytes) -> _Target | str:
    """A redirect's target, or why it is refused (it is untrusted input, as any layer content)."""
    try:
        parsed = schema.parse_redirect(value)
    except ValueError as e:
        return str(e)
    return _Target("/".join(parsed.components), parsed.absolute)


class _Layers:
    """The opened layer roots and the lookup rule over them. Owns every descriptor it opens."""

    def __init__(self, upper: Path, lowers: Sequence[Path]) -> None:
        self._fds: list[int] = []
        self.roots: list[_Real] = []
        for index, path in enumerate((upper, *lowers)):
            role = "upper" if index == 0 else "lower"
            try:
                fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                self.close()
                raise CowfsError(f"{role} directory {str(path)!r} does not exist") from None
            except NotADirectoryError:
                self.close()
                raise CowfsError(f"{role} {str(path)!r} is not a directory") from None
            except OSError as e:
                self.close()
                raise CowfsError(f"cannot read {role} directory {str(path)!r}: {e.strerror}") \
                    from None
            self._fds.append(fd)
            self.roots.append(self._real(index, fd, os.fstat(fd)))

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def mark(self) -> int:
        """A point to :meth:`release` back to: the walk is depth-first, so descriptors opened
        for one entry (and everything below it) are closed when that entry is done."""
        return len(self._fds)

    def release(self, mark: int) -> None:
        for fd in self._fds[mark:]:
            os.close(fd)
        del self._fds[mark:]

    def _real(self, layer: int, fd: int, st: os.stat_result) -> _Real:
        if not stat.S_ISDIR(st.st_mode):
            return _Real(layer, fd, st)
        mark = schema.DirMark.PLAIN
        for name in self._names(layer, "opaque"):
            value = realfs.getxattr(fd, name)
            if value is not None:
                mark = schema.dir_mark(value)
                break
        redirect = None
        for name in self._names(layer, "redirect"):
            redirect = realfs.getxattr(fd, name)
            if redirect is not None:
                break
        return _Real(layer, fd, st, mark, redirect)

    @staticmethod
    def _names(layer: int, suffix: str) -> tuple[str, ...]:
        """The upper holds only cowfs's own spelling; lowers may come from the kernel too."""
        names = schema.overlay_xattr_names(suffix)
        return names[:1] if layer == 0 else names

    def is_xattr_whiteout(self, real: _Real) -> bool:
        return schema.may_be_xattr_whiteout(real.st.st_mode, real.st.st_size) and any(
            realfs.getxattr(real.fd, n) is not None
            for n in self._names(real.layer, "whiteout"))

    def open(self, parent: _Real, name: str) -> _Real | None:
        """The object ``name`` in one layer's directory, as it is (whiteouts included)."""
        fd = realfs.open_path(parent.fd, name)
        if fd is None:
            return None
        return self._real(parent.layer, self.keep(fd), os.fstat(fd))

    def probe(self, parent: _Real, name: str) -> _Real | _WhiteoutT | None:
        """Look ``name`` up in one layer's directory (the kernel's ovl_lookup_single)."""
        real = self.open(parent, name)
        if real is None:
            return None
        if schema.is_device_whiteout(real.st.st_mode, real.st.st_rdev):
            return _WHITEOUT
        if parent.mark is schema.DirMark.XWHITEOUTS and self.is_xattr_whiteout(real):
            return _WHITEOUT
        return real

    def _open_path(self, layer: int, path: str) -> tuple[_Real, str] | None:
        """The parent directory of ``path`` in one layer (reached without following symlinks),
        and the last name; None when a component is missing or not a directory."""
        parent = self.roots[layer]
        *dirs, name = path.split("/")
        for component in dirs:
            child = self.open(parent, component)
            if child is None or not child.is_dir:
                return None
            parent = child
        return parent, name

    def lookup(self, parents: Sequence[_Real], name: str, path: str,
               target: _Target | None = None) -> tuple[_Real, ...]:
        """The real objects that make up ``path`` (whose parent merges ``parents``, topmost
        first), topmost first; empty when nothing is visible. With ``target``, the lookup starts
        at a redirect's target instead (used for an upper directory's redirect)."""
        if parents:
            first = parents[0].layer
        elif target is not None and target.absolute:
            first = 1  # an absolute redirect reaches the lowers whatever the parent is
        else:
            return ()
        by_layer = {p.layer: p for p in parents}
        taken: list[_Real] = []
        for layer in range(first, len(self.roots)):
            found = self._probe_in(layer, by_layer.get(layer), name, target)
            if found is None:
                continue
            if isinstance(found, _WhiteoutT):
                break
            if taken and not found.is_dir:
                break
            taken.append(found)
            if not found.is_dir or found.mark is schema.DirMark.OPAQUE:
                break
            if found.redirect is not None:
                parsed = parse_redirect(found.redirect)
                if isinstance(parsed, str):
                    break  # the mount refuses such a redirect; nothing below is shown
                target = parsed
        return tuple(taken)

    def _probe_in(self, layer: int, parent: _Real | None, name: str,
                  target: _Target | None) -> _Real | _WhiteoutT | None:
        if target is None:
            return None if parent is None else self.probe(parent, name)
        if not target.absolute:
            return None if parent is None else self.probe(parent, target.path)
        where = self._open_path(layer, target.path)
        if where is None:
            return None
        return self.probe(*where)


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


def _same_data(upper: _Real, lower: _Real) -> bool:
    kind = upper.kind
    if kind is Kind.SYMLINK:
        return realfs.readlink(upper.fd) == realfs.readlink(lower.fd)
    if kind in (Kind.CHAR, Kind.BLOCK):
        return upper.st.st_rdev == lower.st.st_rdev
    if kind is not Kind.FILE:
        return True
    if upper.st.st_size != lower.st.st_size:
        return False
    a = realfs.reopen(upper.fd, os.O_RDONLY)
    try:
        b = realfs.reopen(lower.fd, os.O_RDONLY)
        try:
            while True:
                x, y = os.read(a, _CHUNK), os.read(b, _CHUNK)
                if x != y:
                    return False
                if not x:
                    return True
        finally:
            os.close(b)
    finally:
        os.close(a)


def _same_metadata(upper: _Real, lower: _Real) -> bool:
    a, b = upper.st, lower.st
    if (stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid) != (stat.S_IMODE(b.st_mode), b.st_uid,
                                                          b.st_gid):
        return False
    if upper.kind not in (Kind.DIR, Kind.SYMLINK) and a.st_mtime_ns != b.st_mtime_ns:
        return False
    return visible_xattrs(upper.fd) == visible_xattrs(lower.fd)


# --- the walk ------------------------------------------------------------------------------------


def check_format(upper: Path) -> None:
    """Refuse an upper written by a cowfs with another layer format."""
    try:
        found = os.getxattr(upper, schema.XATTR_FORMAT)
    except OSError:
        return
    if found != schema.FORMAT_VERSION:
        raise CowfsError(f"upper directory {str(upper)!r} has cowfs layer format {found!r}; "
                         f"this cowfs understands format {schema.FORMAT_VERSION!r}")


def walk(upper: Path, lowers: Sequence[Path], work: Path | None = None) -> Iterator[Change]:
    """Every change the upper makes to what the lowers (topmost first) show. ``work`` is the
    work directory (default: the upper's own), whose hard-link index serves some names."""
    check_format(upper)
    layers = _Layers(upper, lowers)
    try:
        walker = _Walker(layers)
        yield from walker.run()
        yield from walker.indexed(work if work is not None else upper / schema.WORK_DIR_NAME)
    finally:
        layers.close()


class _Walker:
    def __init__(self, layers: _Layers) -> None:
        self.layers = layers
        self.links: dict[tuple[int, int], str] = {}
        #: Upper paths seen by the walk, so that index-served names are not reported twice.
        self.seen: set[str] = set()

    def run(self) -> Iterator[Change]:
        root, *lower_roots = self.layers.roots
        # The root merges every layer's root whatever their marks say, as the mount does.
        lowers = tuple(_Real(r.layer, r.fd, r.st, r.mark) if r.mark is not schema.DirMark.OPAQUE
                       else _Real(r.layer, r.fd, r.st) for r in lower_roots)
        if lowers and not _same_metadata(root, lowers[0]):
            yield Modified(".", Kind.DIR, data=False)
        yield from self._directory(".", root, lowers)

    def _directory(self, path: str, upper: _Real, lowers: tuple[_Real, ...]) -> Iterator[Change]:
        for name in sorted(realfs.list_names(upper.fd)):
            if path == "." and name == schema.WORK_DIR_NAME:
                continue
            mark = self.layers.mark()
            try:
                child = self.layers.open(upper, name)
                if child is None:
                    continue  # removed while we looked: the walk describes a layer at rest
                yield from self._entry(join(path, name), name, upper, child, lowers)
            finally:
                self.layers.release(mark)

    def _entry(self, path: str, name: str, parent: _Real, real: _Real,
               lowers: tuple[_Real, ...]) -> Iterator[Change]:
        if self._is_whiteout(parent, real):
            below = self.layers.lookup(lowers, name, path)
            if below:
                yield Deleted(path, below[0].kind)
            else:
                yield Anomaly(path, Problem.STRAY_WHITEOUT)
            return
        if self.layers.is_xattr_whiteout(real):
            problem = (Problem.WHITEOUT_IN_OPAQUE if parent.mark is schema.DirMark.OPAQUE
                       else Problem.UNMARKED_WHITEOUT)
            yield Anomaly(path, problem)
        if real.is_dir:
            yield from self._dir_entry(path, name, real, lowers)
            return
        if real.redirect is not None:
            yield Anomaly(path, Problem.NONDIR_REDIRECT)
        below = self.layers.lookup(lowers, name, path)
        yield self._nondir(path, real, below[0] if below else None)

    def _is_whiteout(self, parent: _Real, real: _Real) -> bool:
        if schema.is_device_whiteout(real.st.st_mode, real.st.st_rdev):
            return True
        return parent.mark is schema.DirMark.XWHITEOUTS and self.layers.is_xattr_whiteout(real)

    def _dir_entry(self, path: str, name: str, real: _Real,
                   lowers: tuple[_Real, ...]) -> Iterator[Change]:
        at = self.layers.lookup(lowers, name, path)
        below: tuple[_Real, ...] = ()
        if real.mark is schema.DirMark.OPAQUE:
            yield Replaced(path, Kind.DIR, at[0].kind) if at else Added(path, Kind.DIR)
        elif real.redirect is not None:
            parsed = parse_redirect(real.redirect)
            if isinstance(parsed, str):
                yield Anomaly(path, Problem.BAD_REDIRECT, parsed)
                yield Added(path, Kind.DIR)
            else:
                below = self.layers.lookup(lowers, name, path, parsed)
                source = parsed.path if parsed.absolute else join(posixpath.dirname(path) or ".",
                                                                  parsed.path)
                if below and below[0].is_dir:
                    yield Renamed(path, source, not _same_metadata(real, below[0]))
                else:
                    yield Anomaly(path, Problem.MISSING_REDIRECT, source)
                    yield Added(path, Kind.DIR)
                    below = ()
        elif not at:
            yield Added(path, Kind.DIR)
        elif not at[0].is_dir:
            yield Replaced(path, Kind.DIR, at[0].kind)
        else:
            if not _same_metadata(real, at[0]):
                yield Modified(path, Kind.DIR, data=False)
            below = at
        yield from self._directory(path, real, below)

    def _nondir(self, path: str, real: _Real, lower: _Real | None) -> Change:
        self.seen.add(path)
        first = None
        if real.st.st_nlink > 1:
            key = (real.st.st_dev, real.st.st_ino)
            first = self.links.setdefault(key, path)
        link = first if first != path else None
        if lower is None:
            return Added(path, real.kind, link)
        if lower.kind is not real.kind:
            return Replaced(path, real.kind, lower.kind)
        if not _same_data(real, lower):
            return Modified(path, real.kind, True, link)
        if not _same_metadata(real, lower):
            return Modified(path, real.kind, False, link)
        return Unchanged(path, real.kind, link)

    # --- names served from the hard-link index --------------------------------------------------

    def indexed(self, work: Path) -> Iterator[Change]:
        """Records for the lower names of copied-up hard-linked inodes that the upper does not
        hold: the mount serves them from the index entry (``WORK/index/<layer>-<ino>``).

        Known limit: finding those names needs a scan of the lower layers for hard-linked files;
        it is done only when the index has entries.
        """
        entries = _index_entries(work)
        if not entries:
            return
        index_fd = os.open(work / schema.WORK_INDEX_NAME,
                           os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for path, entry in self._indexed_names(entries):
                mark = self.layers.mark()
                try:
                    record = self._indexed(path, entry, index_fd)
                    if record is not None:
                        yield record
                finally:
                    self.layers.release(mark)
        finally:
            os.close(index_fd)

    def _indexed_names(self, entries: set[str]) -> list[tuple[str, str]]:
        found = []
        for root in self.layers.roots[1:]:
            for path, st in _hard_linked_files(root.fd):
                entry = schema.index_name(root.layer, st.st_ino)
                if entry in entries and path not in self.seen:
                    found.append((path, entry))
        return sorted(set(found))

    def _indexed(self, path: str, entry: str, index_fd: int) -> Change | None:
        """The record for ``path`` if the merged view shows the indexed lower inode there."""
        reals: tuple[_Real, ...] = tuple(self.layers.roots)
        parts = path.split("/")
        for i, name in enumerate(parts):
            reals = self.layers.lookup(reals, name, "/".join(parts[: i + 1]))
            if not reals:
                return None
        top = reals[0]
        if top.layer == 0 or top.is_dir or \
                schema.index_name(top.layer, top.st.st_ino) != entry:
            return None
        fd = realfs.open_path(index_fd, entry)
        if fd is None:
            return None
        copy = _Real(0, self.layers.keep(fd), os.fstat(fd))
        key = (copy.st.st_dev, copy.st.st_ino)
        first = self.links.setdefault(key, path)
        link = first if first != path else None
        if not _same_data(copy, top):
            return Modified(path, copy.kind, True, link, entry)
        if not _same_metadata(copy, top):
            return Modified(path, copy.kind, False, link, entry)
        return Unchanged(path, copy.kind, link, entry)


def _index_entries(work: Path) -> set[str]:
    try:
        return set(os.listdir(work / schema.WORK_INDEX_NAME))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _hard_linked_files(root_fd: int) -> Iterator[tuple[str, os.stat_result]]:
    """Regular files with several names under a layer root, by path (no symlink followed)."""
    pending = [(".", os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd))]
    try:
        while pending:
            path, fd = pending.pop()
            try:
                for name in realfs.list_names(fd):
                    if path == "." and name == schema.WORK_DIR_NAME:
                        continue
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        child = realfs.open_path(fd, name)
                        if child is not None:
                            pending.append((join(path, name), child))
                    elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                        yield join(path, name), st
            finally:
                os.close(fd)
    finally:
        for _, fd in pending:
            os.close(fd)


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
    layers = _Layers(upper, lowers)
    try:
        reals: tuple[_Real, ...] = (layers.roots[0], *(
            _Real(r.layer, r.fd, r.st, r.mark) for r in layers.roots[1:]))
        if path != ".":
            parts = path.split("/")
            for i, name in enumerate(parts):
                reals = layers.lookup(reals, name, "/".join(parts[: i + 1]))
                if not reals or not reals[0].is_dir:
                    raise CowfsError(f"{path!r} is not a directory of the merged view")
        yield from _merged_children(layers, path, reals)
    finally:
        layers.close()


def _merged_children(layers: _Layers, path: str,
                     reals: tuple[_Real, ...]) -> Iterator[Visible]:
    names: dict[str, None] = {}
    for real in reals:
        names.update(dict.fromkeys(realfs.list_names(real.fd)))
    for name in sorted(names):
        if path == "." and name == schema.WORK_DIR_NAME:
            continue
        child = join(path, name)
        mark = layers.mark()
        try:
            taken = layers.lookup(reals, name, child)
            if not taken:
                continue
            top = taken[0]
            yield Visible(child, top.fd, top.st, top.layer)
            if top.is_dir:
                yield from _merged_children(layers, child, taken)
        finally:
            layers.release(mark)
