"""``cowfs export`` and ``cowfs import``: an upper layer as an OCI image layer tar, and back.

The OCI image-spec layer format (image-spec/layer.md) differs from the overlay format in how it
records what a layer removes:

=================================  ====================================================
overlay (cowfs upper)              OCI layer tar
=================================  ====================================================
whiteout (xattr or char dev 0/0)   an empty file ``.wh.NAME`` beside it
``user.overlay.opaque=y``          an empty file ``DIR/.wh..wh..opq``
renamed dir (``overlay.redirect``) the whole directory at its new name, made opaque,
                                   and a whiteout at its old name (OCI has no renames)
hard links in the upper            tar hard links to the first name
=================================  ====================================================

Import makes whiteouts as char devices 0/0 (any user may, Linux 5.8), else xattr whiteouts.
User xattrs travel as PAX ``SCHILY.xattr.NAME`` records under the names users see (unescaped);
import stores them escaped again. Import refuses unsafe members with a clear error: absolute
names, ``..``, hard links that point outside the layer or to nothing before them, and anything
that would be written through a symlink. Symlink *targets* are stored verbatim and never followed
(``/usr/bin/awk -> /etc/alternatives/awk`` is normal in image layers). An import is built in a
temporary directory beside DIR and renamed into place only when complete, so a corrupt archive
leaves nothing behind.

Known limits: gzip is the only compression (Python's tarfile has no zstd before 3.14); sockets
are skipped on export (tar cannot hold them).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import re
import stat
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Self, TextIO, cast

from ..core import realfs, schema
from ..core.dirstack import PathDirs
from ..core.errors import CowfsError
from ..core.resolve import InvalidRedirectError
from ..core.wording import counted
from . import outputs, plans
from .changes import quote
from .walk import (
    Added,
    Anomaly,
    Change,
    Deleted,
    Kind,
    Modified,
    Problem,
    Renamed,
    Replaced,
    Stack,
    Unchanged,
    merged_tree,
    visible_xattrs,
    walk,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
#: aufs's own metadata names, which docker also skips.
AUFS_META_PREFIX = ".wh..wh."
XATTR_PAX_PREFIX = "SCHILY.xattr."

_TAR_TYPES = {
    stat.S_IFREG: tarfile.REGTYPE,
    stat.S_IFDIR: tarfile.DIRTYPE,
    stat.S_IFLNK: tarfile.SYMTYPE,
    stat.S_IFIFO: tarfile.FIFOTYPE,
    stat.S_IFCHR: tarfile.CHRTYPE,
    stat.S_IFBLK: tarfile.BLKTYPE,
}


#: Test seams (see :func:`cowfs.tools.plans.fault_point`): ``N:SIGNAL`` after the N-th record
#exported
#: or member imported.
EXPORT_FAULT = "COWFS_TEST_EXPORT_FAULT"
IMPORT_FAULT = "COWFS_TEST_IMPORT_FAULT"


def _pax_text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


# --- export --------------------------------------------------------------------------------------


def tar_mtime(st: os.stat_result) -> int:
    """A member's mtime: whole seconds (the same tree gives the same bytes: no float in a PAX
    record), clamped to ``SOURCE_DATE_EPOCH`` when it is set, as reproducible-builds tools do."""
    mtime = max(0, int(st.st_mtime))
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    return min(mtime, int(epoch)) if epoch.isdigit() else mtime


class _Writer:
    """Adds layer objects to a tar; remembers what it added (parents, hard links)."""

    def __init__(self, tar: tarfile.TarFile, progress: plans.Progress) -> None:
        self.tar = tar
        self.progress = progress
        #: Opens an object's data for reading; set to the walk stack's (metacopy files' data
        #: is in a lower layer) while records are exported.
        self.open_data: Callable[[int, int], IO[bytes]] = lambda fd, layer: os.fdopen(
            realfs.reopen(fd, os.O_RDONLY), "rb")
        self.added: set[str] = set()
        self.inodes: dict[tuple[int, int], str] = {}
        self.count = 0

    def object(self, path: str, fd: int, st: os.stat_result, layer: int = 0) -> None:
        """``layer``: the index of the layer ``fd`` is in (0: the upper)."""
        kind = stat.S_IFMT(st.st_mode)
        if kind not in _TAR_TYPES:
            print(f"cowfs: warning: {quote(path)}: sockets cannot be exported; skipped",
                  file=sys.stderr)
            return
        info = tarfile.TarInfo("./" + path if path != "." else ".")
        info.type = _TAR_TYPES[kind]
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = tar_mtime(st)
        if kind != stat.S_IFLNK:
            info.pax_headers = {XATTR_PAX_PREFIX + name: _pax_text(value)
                                for name, value in sorted(visible_xattrs(fd).items())}
        if kind == stat.S_IFLNK:
            info.linkname = realfs.readlink(fd)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        key = (st.st_dev, st.st_ino)
        # One inode met twice is a hard link (an index entry serves several names while its
        # st_nlink counts only its upper names, so st_nlink cannot tell).
        if kind != stat.S_IFDIR and key in self.inodes:
            info.type = tarfile.LNKTYPE
            info.linkname = "./" + self.inodes[key]
            self._add(path, info)
            return
        if kind == stat.S_IFREG:
            info.size = st.st_size
            with self.open_data(fd, layer) as data:
                # tarfile only calls read(): the counting wrapper is file enough.
                self._add(path, info, cast(IO[bytes], _Counted(data, self.progress)))
        else:
            self._add(path, info)
        if kind != stat.S_IFDIR:
            self.inodes[key] = path

    def marker(self, path: str) -> None:
        """An empty regular file: a whiteout or the opaque marker."""
        info = tarfile.TarInfo("./" + path)
        info.mode = 0o644
        self._add(path, info)

    def _add(self, path: str, info: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        self.tar.addfile(info, data)
        self.added.add(path)
        self.count += 1


class _Counted:
    """A file that tarfile reads a member's data from, counting the bytes for the progress bar
    (so that one large file moves the bar too)."""

    def __init__(self, data: IO[bytes], progress: plans.Progress) -> None:
        self.data = data
        self.progress = progress

    def read(self, size: int = -1) -> bytes:
        chunk = self.data.read(size)
        self.progress.advance(len(chunk))
        return chunk


def _export_bytes(upper: Path, lowers: Sequence[Path], work: Path,
                  records: Sequence[Change]) -> int:
    """The file data an export writes: the total of its progress bar."""
    total = 0
    upper_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs = PathDirs(upper_fd)
    try:
        for record in records:
            match record:
                case Renamed(path=path):
                    total += sum(v.st.st_size for v in merged_tree(upper, lowers, path)
                                 if stat.S_ISREG(v.st.st_mode))
                case Modified(via_index=str(entry)) | Unchanged(via_index=str(entry)):
                    total += _size_at(work / schema.WORK_INDEX_NAME / entry)
                case Added(path=path) | Modified(path=path) | Unchanged(path=path) | Replaced(
                        path=path):
                    with contextlib.suppress(OSError), dirs.parent_of(path) as (dirfd, name):
                        total += _size_at(name, dirfd)
    finally:
        dirs.close()
        os.close(upper_fd)
    return total


def _size_at(path: Path | str, dirfd: int | None = None) -> int:
    try:
        st = os.stat(path, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return 0
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


def _missing_parents(path: str, added: set[str]) -> list[str]:
    """The parent directories of ``path`` not added yet, outermost first (those above the first
    added one are too: a directory is added after its parents)."""
    missing = []
    parent = path.rpartition("/")[0]
    while parent and parent not in added:
        missing.append(parent)
        parent = parent.rpartition("/")[0]
    return missing[::-1]


def _open_upper(dirs: PathDirs, path: str) -> int | None:
    """``path`` in the upper (None when it is not there), reached a component at a time."""
    try:
        with dirs.parent_of(path) as (dirfd, name):
            return realfs.open_path(dirfd, name)
    except (FileNotFoundError, NotADirectoryError):
        return None


class DirsBelow:
    """Whether the layers below an upper (topmost first) show a directory at a path: a lookup
    through their merged view, as the mount's (:class:`cowfs.walk.Stack`)."""

    def __init__(self, below: Sequence[Path]) -> None:
        self.stack = Stack(below[0], below[1:]) if below else None

    def close(self) -> None:
        if self.stack is not None:
            self.stack.close()

    def shows_dir(self, path: str) -> bool:
        if self.stack is None:
            return False
        mark = self.stack.mark()
        try:
            reals = self.stack.roots
            for name in path.split("/") if path != "." else ():
                reals = self.stack.resolve(reals, name)
                if not reals or not reals[0].is_dir:
                    return False
            return True
        except InvalidRedirectError:
            return True  # what the mount refuses: keep the marker, which hides it
        finally:
            self.stack.release(mark)


def _export_records(writer: _Writer, upper: Path, lowers: Sequence[Path], work: Path,
                    records: Sequence[Change]) -> None:
    upper_fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    dirs = PathDirs(upper_fd)
    index = work / schema.WORK_INDEX_NAME
    materialized: list[str] = []
    stack = Stack(upper, lowers)
    writer.open_data = stack.open_data  # a metacopy file's data is its lower file's
    below = DirsBelow(lowers)

    def opaque_marker(path: str) -> None:
        """Only where the layers below show a directory: a renamed directory is opaque
        wherever it goes, and a marker that hides nothing would make the same content
        another layer (and, imported, a directory that is not)."""
        if below.shows_dir(path):
            writer.marker(f"{path}/{OPAQUE_MARKER}")

    try:
        def add_one(path: str) -> bool:
            fd = _open_upper(dirs, path)
            if fd is None:
                return False
            try:
                writer.object(path, fd, os.fstat(fd))
            finally:
                os.close(fd)
            return True

        def add_upper(path: str) -> None:
            for parent in _missing_parents(path, writer.added):
                add_one(parent)
            if not add_one(path):
                raise FileNotFoundError(errno.ENOENT, "not in the upper", path)

        for number, record in enumerate(records, start=1):
            plans.fault_point(EXPORT_FAULT, number)
            if any(record.path.startswith(m + "/") for m in materialized):
                continue  # already written whole, with the rest of its renamed directory
            match record:
                case Deleted(path=path):
                    parent, _, name = path.rpartition("/")
                    if parent and parent not in writer.added:
                        add_upper(parent)
                    writer.marker(f"{parent}/{WHITEOUT_PREFIX}{name}" if parent
                                  else WHITEOUT_PREFIX + name)
                case Replaced(path=path, kind=Kind.DIR):
                    add_upper(path)
                    opaque_marker(path)
                case Renamed(path=path):
                    add_upper(path)
                    opaque_marker(path)
                    for visible in merged_tree(upper, lowers, path):
                        writer.object(visible.path, visible.fd, visible.st, visible.layer)
                    materialized.append(path)
                case Modified(path=path, via_index=str(entry)) | Unchanged(
                        path=path, via_index=str(entry)):
                    for parent in _missing_parents(path, writer.added):
                        if not add_one(parent):
                            break  # a directory the upper lacks needs no entry
                    fd = os.open(index / entry, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
                    try:
                        writer.object(path, fd, os.fstat(fd))
                    finally:
                        os.close(fd)
                case Added(path=path) | Modified(path=path) | Unchanged(path=path) | Replaced(
                        path=path):
                    if path == ".":
                        add_upper_root(writer, upper_fd)
                    else:
                        add_upper(path)
                case Anomaly():
                    pass
    finally:
        below.close()
        stack.close()
        dirs.close()
        os.close(upper_fd)


def add_upper_root(writer: _Writer, upper_fd: int) -> None:
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=upper_fd)
    try:
        writer.object(".", fd, os.fstat(fd))
    finally:
        os.close(fd)


def _wants_gzip(output: str, gzip_flag: bool) -> bool:
    return gzip_flag or output.endswith((".gz", ".tgz"))


def gzip_writer(raw: IO[bytes]) -> gzip.GzipFile:
    """A gzip stream onto ``raw`` whose header holds no file name and time 0, so that the same
    tar always compresses to the same bytes (tarfile's own ``w:gz`` writes the output's name and
    the time of now); level 6, as gzip(1) and Go (docker, podman) default to (9 costs about
    twice the time). Every compressed layer cowfs writes goes through it. Closing it does not
    close ``raw``."""
    return gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)


@contextlib.contextmanager
def _tar_writer(raw: IO[bytes], compress: bool) -> Iterator[tarfile.TarFile]:
    """A PAX tar written as a stream onto ``raw``, through :func:`gzip_writer` when
    ``compress``."""
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(gzip_writer(raw)) if compress else raw
        yield stack.enter_context(tarfile.open(fileobj=cast(IO[bytes], sink), mode="w|",
                                               format=tarfile.PAX_FORMAT))


def export_layer(upper: Path, lowers: Sequence[Path], output: str, *, gzip_flag: bool = False,
                 out: TextIO | None = None, work: Path | None = None) -> int:
    """Write ``upper`` (against ``lowers``) as an OCI layer tar; returns the number of entries.
    ``work``: the work directory whose hard-link index serves some names (default: the upper's)."""
    if output.endswith((".zst", ".zstd")):
        raise CowfsError("zstd compression is not supported; use .tar or .tar.gz")
    work = work if work is not None else schema.default_work_dir(upper)
    records = list(walk(upper, lowers, work))
    problems = [r for r in records
                if isinstance(r, Anomaly) and r.problem is not Problem.STRAY_WHITEOUT]
    if problems:
        raise CowfsError(f"{str(upper)!r} has {counted(len(problems), 'problem')}, e.g. "
                         f"{quote(problems[0].path)}: {problems[0].problem.value}; run "
                         f"'cowfs check {upper}' first")
    compress = _wants_gzip(output, gzip_flag)
    if output == "-":
        if sys.stdout.isatty():
            raise CowfsError("refusing to write a tar archive to a terminal; use -o FILE")
        with _interruption_reported("export", "the tar on stdout is incomplete"), \
                _tar_writer(sys.stdout.buffer, compress) as tar, \
                plans.Progress(_export_bytes(upper, lowers, work, records), "export") as bar:
            writer = _Writer(tar, bar)
            _export_records(writer, upper, lowers, work, records)
        return writer.count
    target = Path(output)
    if target.is_dir():
        raise CowfsError(f"{output!r} is a directory; give the name of the tar file to write, "
                         f"e.g. -o {os.path.join(output, 'layer.tar')}")
    made = outputs.make_dirs(target.parent)
    try:
        plans.remove_stale_temporaries(target.parent, target.name, "export")
        temp = target.parent / plans.temporary_name(target.name, "export")
        with _interruption_reported("export", f"{output!r} was not written (no partial "
                                        "file is left)"):
            count = _export_to(temp, target, upper, lowers, work, records, compress)
    except BaseException:
        outputs.remove_dirs(made)
        raise
    print(f"exported {counted(count, 'entry', 'entries')} to {output}", file=out or sys.stderr)
    return count


def _export_to(temp: Path, target: Path, upper: Path, lowers: Sequence[Path], work: Path,
               records: Sequence[Change], compress: bool) -> int:
    """Write the tar to ``temp``, then rename it to ``target``; ``temp`` is removed on any
    failure."""
    try:
        with open(temp, "wb") as raw, _tar_writer(raw, compress) as tar, \
                plans.Progress(_export_bytes(upper, lowers, work, records), "export") as bar:
            writer = _Writer(tar, bar)
            _export_records(writer, upper, lowers, work, records)
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    return writer.count


# --- import --------------------------------------------------------------------------------------


class UnsafeMemberError(CowfsError):
    pass


def _member_path(name: str) -> str:
    """A member's name as a path inside the layer; refuses absolute names and ``..``."""
    if name.startswith("/"):
        raise UnsafeMemberError(f"unsafe member {name!r}: absolute path")
    path = name
    while path.startswith("./"):
        path = path[2:]
    wrapped = f"/{path}/"  # string searches: a deep member has 10,000 parts
    parts = path.split("/")
    if "//" in wrapped or "/./" in wrapped:
        parts = [p for p in parts if p not in ("", ".")]
    if "/../" in wrapped:
        raise UnsafeMemberError(f"unsafe member {name!r}: '..' leaves the layer")
    return "/".join(parts) or "."


class _Extractor:
    """Creates members under ``root``, never following a symlink on the way."""

    def __init__(self, root: Path, progress: plans.Progress,
                 position: Callable[[], int] | None) -> None:
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        #: Members come in tree order: the directories of the last one are kept open.
        self.dirs = PathDirs(self.root_fd, mkdir=lambda fd, name: realfs.mkdir(fd, name, 0o755))
        self.progress = progress
        self.position = position
        self.files: set[str] = set()
        self.whiteouts: set[str] = set()
        #: The whiteouts made as xattr whiteouts (no device whiteouts here): their parents are
        #: marked.
        self.xattr_whiteouts: set[str] = set()
        self.opaque: set[str] = set()
        self.dir_times: dict[str, float] = {}
        #: Directory modes, set last (with the times): a directory made read-only at once would
        #: refuse a plain user its contents and their xattrs.
        self.dir_modes: dict[str, int] = {}
        self.is_root = os.geteuid() == 0

    def close(self) -> None:
        self.dirs.close()
        os.close(self.root_fd)

    @contextlib.contextmanager
    def parent(self, path: str, member: str) -> Iterator[tuple[int, str]]:
        """The directory that holds ``path`` (made if missing), never through a symlink; a
        descriptor of its own (a hard link's target is found while it is open)."""
        where, _, name = path.rpartition("/")
        try:
            fd = os.dup(self.dirs.directory(where))
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:
                raise
            raise UnsafeMemberError(
                f"unsafe member {member!r}: {where!r} is not a directory "
                f"({e.strerror}); refusing to write through it") from None
        try:
            yield fd, name
        finally:
            os.close(fd)

    def _clear(self, dirfd: int, name: str, path: str, keep_dir: bool) -> bool:
        """Make room for a new object; True when a directory is kept to be reused."""
        fd = realfs.open_path(dirfd, name)
        if fd is None:
            return False
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        os.close(fd)
        if is_dir and keep_dir:
            return True
        realfs.remove_tree(dirfd, name)
        if is_dir:
            self.dirs.forget(path)
        self.files.discard(path)
        self.whiteouts.discard(path)
        self.xattr_whiteouts.discard(path)
        return False

    def member(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        path = _member_path(info.name)
        base = path.rpartition("/")[2]
        parent = path.rpartition("/")[0] or "."
        if base == OPAQUE_MARKER:
            self._make_dir(parent, info.name)
            self.opaque.add(parent)
            return
        if base.startswith(AUFS_META_PREFIX):
            return
        if base.startswith(WHITEOUT_PREFIX):
            hidden = base[len(WHITEOUT_PREFIX):]
            if hidden in ("", ".", ".."):
                raise UnsafeMemberError(f"unsafe member {info.name!r}: whiteout of {hidden!r}")
            self._whiteout(f"{parent}/{hidden}" if parent != "." else hidden, info.name)
            return
        if path == ".":
            if not info.isdir():
                raise UnsafeMemberError(f"unsafe member {info.name!r}: the layer root must be a "
                                   "directory")
            self._attributes(self.root_fd, ".", info, ".")
            self.dir_times["."] = info.mtime
            return
        with self.parent(path, info.name) as (dirfd, name):
            self._create(tar, info, path, dirfd, name)

    def _make_dir(self, path: str, member: str) -> None:
        if path == ".":
            return
        with self.parent(path, member) as (dirfd, name):
            if not self._clear(dirfd, name, path, keep_dir=True):
                realfs.mkdir(dirfd, name, 0o755)

    def _whiteout(self, path: str, member: str) -> None:
        """A whiteout as the mount makes it: a 0/0 character device, which the kernel's overlayfs
        reads too and any user may make (Linux 5.8); where the layer's filesystem refuses it, an
        xattr whiteout (an empty mode-0 file marked ``user.overlay.whiteout``, its parent marked
        in :meth:`finish`), marked before its mode is taken away: a plain user may not set a
        ``user.*`` xattr on a file without write permission."""
        with self.parent(path, member) as (dirfd, name):
            self._clear(dirfd, name, path, keep_dir=False)
            if not make_whiteout(dirfd, name):
                self.xattr_whiteouts.add(path)
        self.whiteouts.add(path)

    def _create(self, tar: tarfile.TarFile, info: tarfile.TarInfo, path: str, dirfd: int,
                name: str) -> None:
        if info.isdir():
            if not self._clear(dirfd, name, path, keep_dir=True):
                realfs.mkdir(dirfd, name, 0o700)
            self.dir_times[path] = info.mtime
        else:
            self._clear(dirfd, name, path, keep_dir=False)
            if info.islnk():
                target = _member_path(info.linkname)
                if target not in self.files:
                    raise UnsafeMemberError(f"unsafe member {info.name!r}: hard link to "
                                       f"{info.linkname!r}, which is not a file earlier in the "
                                       "layer")
                with self.parent(target, info.name) as (tfd, tname):
                    os.link(tname, name, src_dir_fd=tfd, dst_dir_fd=dirfd,
                            follow_symlinks=False)
                self.files.add(path)
                return
            if info.isreg():
                source = tar.extractfile(info)
                assert source is not None, "a regular member has data"
                fd = realfs.create_file(dirfd, name, 0o600, os.O_WRONLY)
                with os.fdopen(fd, "wb") as dest, source:
                    while chunk := source.read(1 << 20):
                        dest.write(chunk)
                        self.tick(len(chunk))
                self.files.add(path)
            elif info.issym():
                realfs.symlink(dirfd, name, info.linkname)
            elif info.ischr() or info.isblk():
                kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
                realfs.mknod(dirfd, name, kind | 0o600, os.makedev(info.devmajor, info.devminor))
            elif info.isfifo():
                realfs.mknod(dirfd, name, stat.S_IFIFO | 0o600, 0)
            else:
                raise CowfsError(f"member {info.name!r}: unsupported tar entry type "
                                 f"{info.type!r}")
        self._attributes(dirfd, name, info, path)

    def tick(self, nbytes: int) -> None:
        """Move the progress bar: to the position in the archive file (compressed bytes read),
        or by the member bytes written when the archive is a stream of unknown length."""
        if self.position is not None:
            self.progress.to(self.position())
        else:
            self.progress.advance(nbytes)

    def _attributes(self, dirfd: int, name: str, info: tarfile.TarInfo, path: str) -> None:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        try:
            if not info.issym():
                for key, value in info.pax_headers.items():
                    if key.startswith(XATTR_PAX_PREFIX):
                        xname = key[len(XATTR_PAX_PREFIX):]
                        if schema.is_reserved_xattr(xname):
                            continue
                        with contextlib.suppress(OSError):
                            realfs.setxattr(fd, schema.escape_xattr(xname),
                                            value.encode("utf-8", "surrogateescape"))
            if self.is_root:
                realfs.chown(fd, info.uid, info.gid)
            if info.isdir():
                self.dir_modes[path] = info.mode & 0o7777  # set in finish()
            elif not info.issym():
                realfs.chmod(fd, info.mode & 0o7777)
            if not info.isdir():
                with contextlib.suppress(OSError):
                    realfs.utimens(fd, int(info.mtime * 1e9), int(info.mtime * 1e9))
        finally:
            os.close(fd)

    def finish(self) -> None:
        """Mark whiteouts' parents (or drop whiteouts in opaque directories, where they would
        show as files), mark opaque directories, then set directory times, deepest first."""
        for path in sorted(self.whiteouts):
            parent = path.rpartition("/")[0] or "."
            with self.parent(path, path) as (dirfd, name):
                if parent in self.opaque:
                    realfs.unlink(dirfd, name)
                    continue
                if path not in self.xattr_whiteouts:
                    continue  # a device whiteout needs no mark on its parent
                pfd = os.open(".", os.O_PATH | os.O_CLOEXEC, dir_fd=dirfd)
                try:
                    realfs.setxattr(pfd, schema.XATTR_OPAQUE, schema.OPAQUE_HAS_XWHITEOUTS)
                finally:
                    os.close(pfd)
        for path in sorted(self.opaque):
            if path == ".":
                continue  # opaque means nothing on a layer root
            with self.parent(path, path) as (dirfd, name):
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                try:
                    realfs.setxattr(fd, schema.XATTR_OPAQUE, schema.OPAQUE_YES)
                finally:
                    os.close(fd)
        # Deepest first: a parent made read-only last still lets its children be reached.
        for path in sorted(self.dir_times.keys() | self.dir_modes.keys(),
                           key=lambda p: (p == ".", -p.count("/"), p)):
            if path == ".":
                self._dir_mode_and_time(self.root_fd, path)
                continue
            with self.parent(path, path) as (dirfd, name):
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                try:
                    self._dir_mode_and_time(fd, path)
                finally:
                    os.close(fd)

    def _dir_mode_and_time(self, fd: int, path: str) -> None:
        if path in self.dir_modes:
            realfs.chmod(fd, self.dir_modes[path])
        if path in self.dir_times:
            ns = int(self.dir_times[path] * 1e9)
            realfs.utimens(fd, ns, ns)


def make_whiteout(dirfd: int, name: str) -> bool:
    """A whiteout at ``name``: a 0/0 character device (True), or, where the filesystem refuses
    one, an xattr whiteout (False; its parent needs the mark ``OPAQUE_HAS_XWHITEOUTS``), marked
    before its mode is taken away: a plain user may not set a ``user.*`` xattr on a file without
    write permission."""
    try:
        realfs.mknod_whiteout(dirfd, name)
        return True
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    fd = realfs.create_file(dirfd, name, 0o600, os.O_WRONLY)
    try:
        realfs.setxattr(fd, schema.XATTR_WHITEOUT, b"")
        realfs.chmod(fd, 0)
    finally:
        os.close(fd)
    return False


_HeaderError = tarfile.HeaderError


class _Header(tarfile.TarInfo):
    """tarfile ends an archive quietly at a header it cannot read that is not the first (a
    truncated or corrupt one), so a damaged archive would import in part and say it succeeded.
    This notes such a header on the archive (:func:`_damaged_end`); the end-of-archive marker
    (zero blocks) and the file's end at a block boundary are ends as they should be."""

    @classmethod
    def fromtarfile(cls, tarfile: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile)
        except _HeaderError as e:
            if type(e).__name__ in ("TruncatedHeaderError", "InvalidHeaderError"):
                setattr(tarfile, "_cowfs_damaged", f"{e} at byte {tarfile.offset}")  # noqa: B010
            raise


def _damaged_end(tar: tarfile.TarFile) -> str | None:
    damaged: str | None = getattr(tar, "_cowfs_damaged", None)
    return damaged


@contextlib.contextmanager
def _open_archive(archive: str) -> Iterator[tuple[tarfile.TarFile, plans.Progress,
                                                  Callable[[], int] | None]]:
    """The archive, a progress bar of its bytes, and how far into the file tarfile has read
    (None for stdin, whose length is unknown)."""
    if archive == "-":
        with tarfile.open(fileobj=sys.stdin.buffer, mode="r|*", tarinfo=_Header) as tar, \
                plans.Progress(None, "import") as bar:
            yield tar, bar, None
        return
    with open(archive, "rb") as raw, \
            tarfile.open(fileobj=raw, mode="r:*", tarinfo=_Header) as tar, \
            plans.Progress(os.fstat(raw.fileno()).st_size, "import") as bar:
        yield tar, bar, raw.tell


_CORRUPT = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _corrupt_reason(e: BaseException) -> str:
    """tarfile's "r:*" lists every method it tried, one per line, as ``- method tar:
    ReadError('invalid header')``: the last (tar's), in words."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    last = text.splitlines()[-1].removeprefix("- ")
    found = re.fullmatch(r"""(?:method \w+: )?\w+\((['"])(.*)\1\)""", last)
    return found.group(2) if found else last


def import_layer(archive: str, dest: Path, *, out: TextIO | None = None) -> int:
    """Unpack an OCI layer tar into a new cowfs layer directory ``dest``; returns the number of
    members. ``dest`` must not exist or be an empty directory; it is complete or untouched."""
    if archive != "-" and not Path(archive).is_file():
        raise CowfsError(f"layer archive {archive!r} does not exist"
                         if not Path(archive).exists() else f"{archive!r} is not a file")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CowfsError(f"{str(dest)!r} exists and is not an empty directory")
    if dest.is_dir() and os.path.ismount(dest):
        raise CowfsError(f"{str(dest)!r} is a mountpoint; import into a new directory")
    made = outputs.make_dirs(dest.parent)
    count = 0
    try:
        plans.remove_stale_temporaries(dest.parent, dest.name, "import")
        temp = dest.parent / plans.temporary_name(dest.name, "import")
        with _interruption_reported("import", f"{str(dest)!r} was not created"):
            count = _import_into(archive, dest, temp)
    except BaseException:
        outputs.remove_dirs(made)
        raise
    print(f"imported {counted(count, 'member')} into {dest}", file=out or sys.stderr)
    return count


@contextlib.contextmanager
def _interruption_reported(what: str, result: str) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the block through its cleanup, then as one line."""
    try:
        with plans.interruptible():
            yield
    except plans.Interrupted as e:
        raise CowfsError(f"{what} interrupted ({e}); {result}", e.exit_code) from None


def _unpack_member(extractor: _Extractor, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
    """One member; a system call's failure (a name longer than the filesystem allows, no space
    left) is an error about that member, in one line."""
    try:
        extractor.member(tar, info)
    except OSError as e:
        name = info.name if len(info.name) <= 80 else f"{info.name[:60]}...{info.name[-12:]}"
        if e.errno == errno.ENAMETOOLONG:
            raise CowfsError(f"member {name!r}: a name in it is longer than the filesystem "
                             "allows (255 bytes)") from None
        raise CowfsError(f"member {name!r}: {e.strerror}") from None


def _import_into(archive: str, dest: Path, temp: Path) -> int:
    """Unpack into ``temp``, then rename it to ``dest``; ``temp`` is removed on any failure."""
    count = 0
    temp.mkdir(mode=0o755)
    try:
        extractor: _Extractor | None = None
        try:
            try:
                with _open_archive(archive) as (tar, bar, position):
                    extractor = _Extractor(temp, bar, position)
                    for info in tar:
                        _unpack_member(extractor, tar, info)
                        extractor.tick(0)
                        count += 1
                        plans.fault_point(IMPORT_FAULT, count)
                    damaged = _damaged_end(tar)
                    if damaged is not None:
                        raise CowfsError(f"{archive}: damaged tar archive after "
                                         f"{counted(count, 'member')} ({damaged}); nothing "
                                         "was imported")
            except _CORRUPT as e:
                raise CowfsError(f"{archive}: corrupt or not a tar archive: "
                                 f"{_corrupt_reason(e)}") from None
            if extractor is None:
                raise CowfsError(f"{archive}: corrupt or not a tar archive")
            extractor.finish()
            os.setxattr(temp, schema.XATTR_FORMAT, schema.FORMAT_VERSION)
        finally:
            if extractor is not None:
                extractor.close()
        if dest.exists():
            dest.rmdir()
        os.rename(temp, dest)
    except BaseException:
        plans.remove_path(temp)
        raise
    return count
