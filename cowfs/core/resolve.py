"""Resolving a name through the layer stack (the kernel's fs/overlayfs/namei.c).

For one name in a merged directory, each layer of that directory is probed top-down. A whiteout
hides the name in every layer below; a non-directory hides everything below it; directories merge
until one is opaque. :func:`stack_for_name` is that rule alone, without any I/O, so it is
unit-tested directly;
:func:`resolve` feeds it probes of the real layers, lazily, so that layers hidden by a higher one
are never touched, and follows redirects of renamed directories (``redirect_dir=on`` semantics).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from . import realfs, schema
from .layers import Layer
from .refs import Ref

log = logging.getLogger(__name__)

T = TypeVar("T")


class Data(enum.Enum):
    """Where a regular file's data is: the one value of a copy's data state (the kernel's
    ``ovl_has_upperdata``), read from its marks when it is probed and changed only by
    :mod:`cowfs.daemon.copyup` under the inode's copy-up lock."""

    #: In the file itself (every object that is not one of the two below).
    OWN = "own"
    #: In a lower layer's file (``user.overlay.metacopy``, :mod:`cowfs.core.metacopy`): the copy has
    #: only the metadata.
    LOWER = "lower"
    #: Some blocks in the file, the rest in a lower layer's file (a metacopy file with a data map,
    #: ``user.cowfs.datamap``, :mod:`cowfs.core.partial`).
    PARTIAL = "partial"


@dataclass(frozen=True, slots=True)
class Real:
    """One real object of a layer: held by an ``O_PATH`` descriptor of its own (``held``, the
    owner's to close: what a probe returns), or reached through its :class:`Ref` (``at``; what
    an inode keeps, :mod:`cowfs.core.refs`)."""

    layer: Layer
    #: The descriptor this record owns, or -1 (reached through ``at``).
    held: int
    mode: int
    mark: schema.DirMark = schema.DirMark.PLAIN
    #: For a renamed directory: where its lower content is (see :func:`resolve`).
    redirect: schema.Redirect | None = None
    #: Link count when probed; for lower objects (which never change) it tells hard links apart.
    nlink: int = 1
    #: Inode number when probed (0: unknown), which saves inode numbering an fstat per lookup.
    ino: int = 0
    #: A hard-link index entry (its name count is kept in ``user.cowfs.core.nlink``).
    indexed: bool = False
    #: Where a regular file's data is (:class:`Data`), in the upper or in a lower layer (an older
    #: upper stacked below).
    data: Data = Data.OWN
    #: Where it was found (its parent's reference and its name), when that parent had one.
    at: Ref | None = None

    @property
    def fd(self) -> int:
        """An ``O_PATH`` descriptor of the object: its own, or its reference's (valid until the
        current request ends, :mod:`cowfs.core.refs`)."""
        if self.held >= 0:
            return self.held
        if self.at is None:
            raise OSError(errno.ESTALE, "object released")
        return self.at.fd()

    def release(self) -> None:
        """Close the descriptor this record owns, if any (a probe's; never a reference's)."""
        if self.held >= 0:
            os.close(self.held)

    def kept(self, at: Ref) -> Real:
        """This record as an inode keeps it: reached through ``at``, owning no descriptor (a
        constructor call: ``dataclasses.replace`` costs a lookup several microseconds)."""
        return Real(self.layer, -1, self.mode, self.mark, self.redirect, self.nlink, self.ino,
                    self.indexed, self.data, at)

    def _by_name(self) -> tuple[int, str] | None:
        """For a lower object whose descriptor is not at hand: its parent directory's descriptor
        and its name, to read its xattrs by (lower layers never change while mounted, so the
        name is the object's; the name is not followed). None: use :attr:`fd`."""
        ref = self.at
        if self.held >= 0 or ref is None or ref.pinned >= 0 or self.layer.is_upper or (
                ref.cache.cached(ref)):
            return None
        where = ref.where
        return None if where is None else (where[0].fd(), where[1])

    def getxattr(self, xattr: str) -> bytes | None:
        """The value of the object's xattr ``xattr`` (None if it has none): for a lower object
        not in the cache, one ``lgetxattr`` by name instead of opening it (``ls -l`` asks two
        per file)."""
        by_name = self._by_name()
        if by_name is None:
            return realfs.getxattr(self.fd, xattr)
        return realfs.getxattr_named(by_name[0], by_name[1], xattr)

    def listxattr(self) -> list[str]:
        """The names of the object's xattrs, as :meth:`getxattr` reads them."""
        by_name = self._by_name()
        if by_name is None:
            return realfs.listxattr(self.fd)
        return realfs.listxattr_named(*by_name)

    def named(self, name: str, st: os.stat_result) -> Ref | None:
        """The reference of ``fd`` (``st``), just found at ``name`` in this directory."""
        return None if self.at is None else self.at.cache.named(self.at, name, st)

    @property
    def metacopy(self) -> bool:
        """A file without (all) its data: a metacopy or a partial file."""
        return self.data is not Data.OWN

    @property
    def partial(self) -> bool:
        """A metacopy file whose copy holds some blocks."""
        return self.data is Data.PARTIAL

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def opaque(self) -> bool:
        return self.mark is schema.DirMark.OPAQUE

    def stat(self) -> os.stat_result:
        return os.stat(self.fd)


@dataclass(frozen=True, slots=True)
class Found(Generic[T]):
    """A probe that found an object in a layer."""

    obj: T
    is_dir: bool
    opaque: bool = False
    #: The object's ``lstat``, where the probe made one.
    st: os.stat_result | None = None


class _Whiteout:
    def __repr__(self) -> str:
        return "WHITEOUT"


WHITEOUT: Final = _Whiteout()
Probe = Found[T] | _Whiteout | None


def merge_names(listings: Iterable[Iterable[str]], hidden: Container[str] = ()) -> list[str]:
    """The union of the layers' names, topmost layer's order first, each name once."""
    seen: dict[str, None] = {}
    for names in listings:
        for name in names:
            if name not in hidden:
                seen.setdefault(name, None)
    return list(seen)


def stack_for_name(probes: Iterable[Probe[T]]) -> tuple[list[T], T | None]:
    """Which probed objects make up the merged object, topmost first.

    Returns the objects taken (empty when the name does not exist; one non-directory; or one or
    more directories to merge) and the object that was probed but not taken (a non-directory below
    a directory), which the caller must release. Consumes ``probes`` only as far as needed.
    """
    taken: list[T] = []
    for probe in probes:
        if probe is None:
            continue
        if isinstance(probe, _Whiteout):
            break
        if taken and not probe.is_dir:
            return taken, probe.obj
        taken.append(probe.obj)
        if not probe.is_dir or probe.opaque:
            break
    return taken, None


def _overlay_xattr(fd: int, layer: Layer, suffix: str, present: Container[str]) -> bytes | None:
    """The value of an overlay xattr, in the spellings honoured for this layer (the upper holds
    only cowfs's own ``user.*`` one). ``present`` is the object's listxattr: one system call
    instead of one per spelling, for the usual directory that has none."""
    names = (schema.USER_OVERLAY + suffix,) if layer.is_upper else (
        schema.overlay_xattr_names(suffix))
    for name in names:
        if name in present:
            value = realfs.getxattr(fd, name)
            if value is not None:
                return value
    return None


def read_dir_mark(fd: int, layer: Layer, present: Container[str] | None = None) -> schema.DirMark:
    """A directory's opaque mark."""
    if present is None:
        present = set(realfs.listxattr(fd))
    return schema.dir_mark(_overlay_xattr(fd, layer, "opaque", present))


class InvalidRedirectError(OSError):
    """A redirect that the lookup refuses: ``EIO``, as the kernel answers. ``reason`` says why, for
    the offline tools, which report such a directory as a flaw of the layer instead of failing."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, "invalid redirect")
        self.reason = reason


def read_redirect(fd: int, layer: Layer, present: Container[str]) -> schema.Redirect | None:
    """A directory's redirect. It is untrusted input: an invalid one is refused, never followed."""
    value = _overlay_xattr(fd, layer, "redirect", present)
    if value is None:
        return None
    try:
        return schema.parse_redirect(value)
    except ValueError as e:
        log.warning("refusing invalid redirect in layer %s: %s", layer.path, e)
        raise InvalidRedirectError(str(e)) from None


def has_whiteout_xattr(fd: int, layer: Layer) -> bool:
    """Whether an object carries the whiteout xattr. :func:`probe` honours it only in a directory
    marked ``xwhiteouts``; the offline check also looks for it elsewhere, as a flaw."""
    names = (schema.XATTR_WHITEOUT,) if layer.is_upper else schema.overlay_xattr_names("whiteout")
    return any(realfs.getxattr(fd, name) is not None for name in names)


#: File modes seen, each kept once (a mode is an int of 28 bytes, and most files share a few).
_MODES: dict[int, int] = {}


def _intern_mode(mode: int) -> int:
    kept = _MODES.get(mode)
    if kept is None:
        if len(_MODES) >= 4096:
            return mode
        kept = _MODES[mode] = mode
    return kept


def _stat_only(parent: Real, st: os.stat_result) -> bool:
    """Whether a lazy probe (:func:`probe`) needs nothing but the object's ``lstat``: not a
    directory (whose marks and redirect are xattrs, and whose descriptor its children need) nor
    a possible xattr whiteout."""
    mode = st.st_mode
    return not stat.S_ISDIR(mode) and not (
        parent.mark is schema.DirMark.XWHITEOUTS
        and schema.may_be_xattr_whiteout(mode, st.st_size))


def probe(parent: Real, name: str, *, lazy: bool = False) -> Probe[Real]:
    """Look ``name`` up in one layer's directory. The found object's descriptor is the caller's
    to close (:meth:`Real.release`).

    ``lazy``, for a lookup whose inode keeps references: in a lower layer that holds no
    metacopy files (the only kind whose files' xattrs a lookup does not read), from a directory
    that has a reference, one ``fstatat`` first; an object that needs no more
    (:func:`_stat_only`) gets no descriptor (``held`` is -1: it is reached by its reference
    when a request needs it). Most lookups of a large lower tree are one ``fstatat`` so."""
    if lazy and parent.at is not None and not parent.layer.reads_metacopy:
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if schema.is_device_whiteout(st.st_mode, st.st_rdev):
            return WHITEOUT
        if _stat_only(parent, st):
            return Found(Real(parent.layer, -1, _intern_mode(st.st_mode), nlink=st.st_nlink,
                              ino=st.st_ino, at=parent.named(name, st)), False, st=st)
    fd = realfs.open_path(parent.fd, name)
    if fd is None:
        return None
    st = os.fstat(fd)
    if schema.is_device_whiteout(st.st_mode, st.st_rdev) or (
        parent.mark is schema.DirMark.XWHITEOUTS
        and schema.may_be_xattr_whiteout(st.st_mode, st.st_size)
        and has_whiteout_xattr(fd, parent.layer)
    ):
        os.close(fd)
        return WHITEOUT
    if stat.S_ISDIR(st.st_mode):
        try:
            present = set(realfs.listxattr(fd))
            mark = read_dir_mark(fd, parent.layer, present)
            redirect = None if parent.layer.is_bottom else read_redirect(fd, parent.layer, present)
        except BaseException:
            os.close(fd)
            raise
        real = Real(parent.layer, fd, _intern_mode(st.st_mode), mark, redirect, ino=st.st_ino,
                    at=parent.named(name, st))
        return Found(real, True, mark is schema.DirMark.OPAQUE, st)
    # Only a non-empty regular file can be a metacopy one: one xattr read, on those alone. In a
    # lower layer too when it is a cowfs upper: one that holds metacopy files, stacked as a lower.
    metacopy = parent.layer.reads_metacopy and stat.S_ISREG(st.st_mode) and st.st_size > 0 and (
        _is_marked(fd))
    # A partial file: a metacopy file with a data map (in the upper, or stacked as a lower).
    partial = metacopy and realfs.getxattr(fd, schema.XATTR_DATAMAP) is not None
    data = Data.OWN if not metacopy else Data.PARTIAL if partial else Data.LOWER
    return Found(Real(parent.layer, fd, _intern_mode(st.st_mode), nlink=st.st_nlink,
                      ino=st.st_ino, data=data, at=parent.named(name, st)), False, st=st)


def _is_marked(fd: int) -> bool:
    """Whether a regular file carries the metacopy mark. A lower file that the daemon may not
    read (``user.*`` xattrs need read permission) is not one: its data could not be read anyway,
    and its lookup must not fail."""
    try:
        return realfs.getxattr(fd, schema.XATTR_METACOPY) is not None
    except PermissionError:
        return False


def root_real(layer: Layer) -> Real:
    """A layer root as a lookup parent, held by a descriptor of its own. The merged root merges
    every layer's root whatever their marks say (as the kernel does): opaque has no meaning on a
    layer root, only the ``xwhiteouts`` mark matters there."""
    fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=layer.root_fd)
    mark = read_dir_mark(fd, layer)
    return Real(layer, fd, os.fstat(fd).st_mode,
                schema.DirMark.PLAIN if mark is schema.DirMark.OPAQUE else mark)


def is_hidden_name(parent_is_root: bool, name: str) -> bool:
    """Names never shown in the merged view: the default work directory at the root."""
    return parent_is_root and name == schema.WORK_DIR_NAME


def probe_path(root: Real, components: tuple[str, ...]) -> Probe[Real]:
    """Probe a path below a layer root, one component at a time, never following a symlink.

    Only the last component's probe counts; anything but a directory on the way means "missing".
    """
    parent, opened = root, None
    try:
        for part in components[:-1]:
            found = probe(parent, part)
            if not isinstance(found, Found) or not found.is_dir:
                if isinstance(found, Found):
                    os.close(found.obj.fd)
                return None
            if opened is not None:
                os.close(opened)
            parent, opened = found.obj, found.obj.fd
        return probe(parent, components[-1])
    finally:
        if opened is not None:
            os.close(opened)


def _probes(parents: tuple[Real, ...], roots: tuple[Real, ...],
            name: str, lazy: bool = False) -> Iterator[Probe[Real]]:
    """Probe ``name`` layer by layer, following redirects of the directories found on the way.

    Without a redirect, a layer is probed in the parent's directory of that layer, and only the
    parent's layers are probed. After an absolute redirect, each further layer is probed at that
    path from its root, whether the parent exists there or not (as the kernel does). A relative
    redirect replaces the name.
    """
    by_layer = {p.layer.index: p for p in parents}
    path: tuple[str, ...] | None = None
    lookup = name
    for root in roots:
        index = root.layer.index
        if index < parents[0].layer.index:
            continue
        if path is not None:
            found = probe_path(root, path)
        elif index in by_layer:
            found = probe(by_layer[index], lookup, lazy=lazy)
        else:
            continue
        yield found
        if isinstance(found, Found) and found.obj.redirect is not None:
            redirect = found.obj.redirect
            if redirect.absolute:
                path = redirect.components
            elif path is not None:
                path = (*path[:-1], *redirect.components)
            else:
                lookup = redirect.components[0]


def resolve(parents: tuple[Real, ...], roots: tuple[Real, ...], name: str) -> tuple[Real, ...]:
    """The real objects behind ``name`` in a merged directory made of ``parents`` (topmost first).

    ``roots`` are the layer roots, for absolute redirects. The caller owns the returned
    descriptors. A refused redirect raises :class:`InvalidRedirectError` after directories above
    it were taken: what was opened is closed then, or each such lookup would leak descriptors.
    """
    return resolve_seen(parents, roots, name)[0]


def resolve_seen(parents: tuple[Real, ...], roots: tuple[Real, ...], name: str, *,
                 lazy: bool = False) -> tuple[tuple[Real, ...], os.stat_result | None]:
    """:func:`resolve`, and the topmost object's ``lstat`` as its probe saw it (for the reply
    to a lookup). ``lazy`` (a lookup, whose inode keeps references): see :func:`probe`; what is
    returned then may hold no descriptor (:meth:`Real.release` closes only what it holds)."""
    if len(parents) == 1 and parents[0].layer.is_bottom:
        # A directory of the bottom layer alone (most of a large lower tree): one probe, and
        # nothing below it to merge or redirect to.
        found = probe(parents[0], name, lazy=lazy)
        return ((found.obj,), found.st) if isinstance(found, Found) else ((), None)
    opened: list[Found[Real]] = []

    def probes() -> Iterator[Probe[Real]]:
        for found in _probes(parents, roots, name, lazy):
            if isinstance(found, Found):
                opened.append(found)
            yield found

    try:
        taken, rejected = stack_for_name(probes())
    except BaseException:
        for found in opened:
            found.obj.release()
        raise
    if rejected is not None:
        rejected.release()
    return tuple(taken), opened[0].st if taken and opened[0].obj is taken[0] else None


def exists_below(parents: tuple[Real, ...], name: str) -> bool:
    """Whether a lower layer of a directory shows ``name`` there (it then needs a whiteout).

    Redirects of what is found do not matter here: only whether the name itself is visible.
    """
    taken, rejected = stack_for_name(probe(p, name) for p in parents if not p.layer.is_upper)
    for real in (*taken, *([rejected] if rejected is not None else [])):
        os.close(real.fd)
    return bool(taken)
