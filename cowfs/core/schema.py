"""The cowfs layer format: every extended-attribute name and value, in one place.

A cowfs upper directory is a valid overlayfs layer in the kernel's ``userxattr`` form
(Documentation/filesystems/overlayfs.rst), so that the kernel can stack it as a lower:

* whiteout: an empty regular file carrying ``user.overlay.whiteout``; its parent directory carries
  ``user.overlay.opaque="x"`` (the kernel only looks for xattr whiteouts in directories so marked);
* opaque directory: ``user.overlay.opaque="y"``;
* cowfs's own metadata lives under ``user.cowfs.*`` (the upper root carries ``user.cowfs.format``).

When reading lower layers, the kernel's other spellings are understood too, so that layers made by
the kernel, Docker or podman stack under cowfs: character-device 0/0 whiteouts and
``trusted.overlay.*``.

Users' own xattrs that collide with the private prefixes are stored escaped, as the kernel does:
``user.overlay.foo`` set through the mount is stored as ``user.overlay.overlay.foo``.
Everything read from a layer is untrusted input, parsed here: redirects and origins are validated
(:func:`parse_redirect`, :func:`parse_origin`) and every number is range-checked
(:func:`parse_number`); a value that fails is ignored by the caller. The JSON records (the stack
record, the commit mark) are decoded by msgspec against a typed schema (:func:`decode_record`):
an unknown field, a wrong type, a number beyond 64 bits or nesting where none belongs is one
ValueError line, never a traceback.
The precise specification is docs/layer-format.md; this module and that page must agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar

import msgspec

FORMAT_VERSION = b"1"

_T = TypeVar("_T")

#: Default name of the work directory inside the upper; hidden at the root of every layer.
WORK_DIR_NAME = ".cowfs-work"
#: The directory inside the work directory where objects are built before being renamed into place,
#: and where removed objects are deleted. With ``WORK_INDEX_NAME``, the only place in the work
#: directory that cowfs writes (see :mod:`cowfs.core.workdir`).
WORK_TMP_NAME = "tmp"
#: The hard-link index inside the work directory: one entry per copied-up lower inode that has
#: several names, named by :func:`index_name`, so that all its names stay one file.
WORK_INDEX_NAME = "index"

USER_OVERLAY = "user.overlay."
TRUSTED_OVERLAY = "trusted.overlay."
COWFS_PREFIX = "user.cowfs."
#: cowfs's metadata on symlinks and special files, which cannot carry ``user.*`` xattrs (root only).
TRUSTED_COWFS_PREFIX = "trusted.cowfs."

#: The private prefixes cowfs reads metadata from, most preferred first; it writes only the first.
OVERLAY_PREFIXES = (USER_OVERLAY, TRUSTED_OVERLAY)

XATTR_OPAQUE = USER_OVERLAY + "opaque"
XATTR_WHITEOUT = USER_OVERLAY + "whiteout"
XATTR_REDIRECT = USER_OVERLAY + "redirect"
#: On an upper regular file copied up without its data (metadata-only copy-up): an empty value.
#: The file is sparse, of the lower file's size; its data is the lower file its origin names
#: (:mod:`cowfs.core.metacopy`). The kernel's ``metacopy`` mark, in the ``userxattr`` spelling.
XATTR_METACOPY = USER_OVERLAY + "metacopy"
#: On a partial file (a metacopy file whose upper copy holds some blocks,
#:mod:`cowfs.core.partial`):
#: which blocks, as :class:`cowfs.core.partial.DataMap` encodes them.
XATTR_DATAMAP = COWFS_PREFIX + "datamap"
XATTR_FORMAT = COWFS_PREFIX + "format"
#: On an upper object copied up from a lower one: ``"<layer>:<inode>:<path>"`` of that lower object
#: (see :class:`Origin`), so that the object keeps its inode number after copy-up and across mounts.
XATTR_ORIGIN = COWFS_PREFIX + "origin"
XATTR_ORIGIN_TRUSTED = TRUSTED_COWFS_PREFIX + "origin"
#: Format 1 before 0.2: on a hard-link index entry, the number of names in the merged view. Read
#: once at mount and converted to :data:`XATTR_LOWER_LINKS`; never written.
XATTR_NLINK = COWFS_PREFIX + "nlink"
#: On a hard-link index entry: how many names of the lower hard-link set are still seen through
#: the lower layer (neither removed nor linked into the upper). The merged view's link count is
#: this plus the entry's upper names (its st_nlink less the index's own name), so that linking and
#: unlinking upper names needs no write here (the kernel keeps its count relative to the upper's
#: too, ``"U%+i"``).
XATTR_LOWER_LINKS = COWFS_PREFIX + "lowerlinks"
#: On a hard-link index entry while a change of :data:`XATTR_LOWER_LINKS` is under way:
#: ``"<new> <old> <expect> <path>"``; see :func:`format_pending` and docs/layer-format.md.
XATTR_PENDING = COWFS_PREFIX + "pending"

#: Longest redirect followed, as the kernel's default ``redirect_max``.
REDIRECT_MAX = 256

OPAQUE_YES = b"y"
#: "This directory is not opaque but holds xattr whiteouts" (kernel 6.7+ ``xwhiteouts``).
OPAQUE_HAS_XWHITEOUTS = b"x"


class DirMark(Enum):
    """What a directory's opaque xattr says about it."""

    PLAIN = "plain"
    OPAQUE = "opaque"
    XWHITEOUTS = "xwhiteouts"


def overlay_xattr_names(suffix: str) -> tuple[str, ...]:
    """Every spelling of an overlay xattr that cowfs honours when reading, preferred first."""
    return tuple(prefix + suffix for prefix in OVERLAY_PREFIXES)


def dir_mark(opaque_value: bytes | None) -> DirMark:
    """Interpret the value of a directory's ``overlay.opaque`` xattr (None when absent)."""
    if opaque_value == OPAQUE_YES:
        return DirMark.OPAQUE
    if opaque_value == OPAQUE_HAS_XWHITEOUTS:
        return DirMark.XWHITEOUTS
    return DirMark.PLAIN


def is_device_whiteout(mode: int, rdev: int) -> bool:
    """The kernel's native whiteout: a character device with device number 0/0."""
    return stat.S_ISCHR(mode) and rdev == 0


def may_be_xattr_whiteout(mode: int, size: int) -> bool:
    """Only empty regular files can be xattr whiteouts; anything else needs no xattr read."""
    return stat.S_ISREG(mode) and size == 0


# --- redirects, origins, index -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Redirect:
    """Where a renamed directory's lower content lives.

    Absolute: a path from the root of each lower layer. Relative: a name in the parent's lower
    directories (the kernel writes these for renames within one directory).
    """

    absolute: bool
    components: tuple[str, ...]


def parse_redirect(value: bytes) -> Redirect:
    """Validate an (untrusted) redirect; ValueError says why it is refused."""
    if not value or len(value) > REDIRECT_MAX:
        raise ValueError(f"redirect of {len(value)} bytes")
    if b"\0" in value:
        raise ValueError("redirect contains a NUL byte")
    text = os.fsdecode(value)
    absolute = text.startswith("/")
    components = tuple(text[1:].split("/")) if absolute else (text,)
    for part in components:
        if part in ("", ".", "..") or (not absolute and "/" in part):
            raise ValueError(f"redirect {text!r} is not a plain path below the layer root")
    return Redirect(absolute, components)


def format_redirect(components: tuple[str, ...]) -> bytes:
    """An absolute redirect (cowfs writes only these: they survive renames of the parents)."""
    return os.fsencode("/" + "/".join(components))


#: Longest lower path an origin may record (the kernel's ``PATH_MAX``).
ORIGIN_PATH_MAX = 4096
#: Longest lower path an origin records as it is; a longer one is recorded by its digest
#: (:data:`ORIGIN_DIGEST`), so that the origin fits the xattr space of every filesystem (ext4
#: has one 4 KiB block for all of an inode's xattrs, where a 4,000-byte path gave ENOSPC).
ORIGIN_PATH_INLINE_MAX = 1024
#: How an origin's third field starts when it holds the SHA-256 of the path (64 hex digits)
#: instead of the path; a path always starts with ``/``.
ORIGIN_DIGEST = b"sha256:"
#: Most lower layers an origin may name (the kernel's ``OVL_MAX_STACK``).
LAYERS_MAX = 500


@dataclass(frozen=True, slots=True)
class Origin:
    """The lower object an upper object was copied up from (``user.cowfs.origin``).

    ``path`` is where that object sits below its layer's root, as recorded at copy-up; None in
    the two-field form written by cowfs before it recorded paths, and when only ``digest`` was
    recorded (the SHA-256 of a path longer than :data:`ORIGIN_PATH_INLINE_MAX`).
    """

    layer: int
    ino: int
    path: tuple[str, ...] | None = None
    digest: bytes | None = None

    def names(self, components: tuple[str, ...]) -> bool:
        """Whether the recorded path (or its digest) is ``components``."""
        if self.path is not None:
            return self.path == components
        return self.digest is not None and self.digest == path_digest(components)


def path_digest(components: tuple[str, ...]) -> bytes:
    """The SHA-256 of a path below a layer root, as an origin records a long one."""
    return hashlib.sha256(os.fsencode("/" + "/".join(components))).digest()


def format_origin(layer_index: int, ino: int, path: tuple[str, ...] | None) -> bytes:
    """``<layer>:<inode>:<path>``, ``<layer>:<inode>:sha256:<hex>`` when the path is longer
    than :data:`ORIGIN_PATH_INLINE_MAX`, or ``<layer>:<inode>`` when it is not known."""
    head = f"{layer_index}:{ino}".encode()
    if path is None:
        return head
    encoded = os.fsencode("/" + "/".join(path))
    if len(encoded) > ORIGIN_PATH_INLINE_MAX:
        return head + b":" + ORIGIN_DIGEST + hashlib.sha256(encoded).hexdigest().encode()
    return head + b":" + encoded


def origin_path_inline(path: tuple[str, ...]) -> bool:
    """Whether an origin records ``path`` itself (not only its digest): what a metacopy or
    partial file's origin must, since its data file is found by walking the path."""
    return len(os.fsencode("/" + "/".join(path))) <= ORIGIN_PATH_INLINE_MAX


def parse_origin(value: bytes) -> Origin:
    """Validate an (untrusted) origin; ValueError says why it is refused."""
    layer_text, sep, rest = value.partition(b":")
    if not sep:
        raise ValueError(f"origin {value[:40]!r} has no ':'")
    ino_text, sep, path = rest.partition(b":")
    layer = parse_number(layer_text, LAYERS_MAX)
    ino = parse_number(ino_text, MAX_INO)
    if layer is None or ino is None:
        raise ValueError(f"origin {value[:60]!r}: the layer must be a decimal number up to "
                         f"{LAYERS_MAX}, the inode one up to {MAX_INO}")
    if layer == 0:
        raise ValueError("origin names layer 0, the upper layer")
    if not sep:
        return Origin(layer, ino)
    if path.startswith(ORIGIN_DIGEST):
        digest = path[len(ORIGIN_DIGEST):]
        if len(digest) != 64 or digest.strip(b"0123456789abcdef"):
            raise ValueError("origin path digest is not 64 lowercase hexadecimal digits")
        return Origin(layer, ino, digest=bytes.fromhex(digest.decode()))
    if len(path) > ORIGIN_PATH_MAX or b"\0" in path or not path.startswith(b"/"):
        raise ValueError("origin path is not an absolute path of at most "
                         f"{ORIGIN_PATH_MAX} bytes")
    components = tuple(os.fsdecode(path)[1:].split("/"))
    if any(part in ("", ".", "..") for part in components):
        raise ValueError(f"origin path {os.fsdecode(path)!r} is not a plain path below the "
                         "layer root")
    return Origin(layer, ino, components)


def index_name(layer_index: int, ino: int) -> str:
    return f"{layer_index}-{ino}"


#: Largest number accepted from a layer where an inode number or a count is expected: anything
#: larger was not written by cowfs (and would overflow the kernel's 64-bit fields).
MAX_INO = (1 << 64) - 1
MAX_COUNT = (1 << 32) - 1


def parse_number(value: bytes | str, maximum: int) -> int | None:
    """A decimal number read from a layer, or None when it is malformed or out of range."""
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        return None
    number = int(text)
    return number if number <= maximum else None


def parse_index_name(name: str) -> tuple[int, int] | None:
    """``(layer, inode)`` of an index entry's name, or None when it is not one."""
    layer, sep, ino = name.partition("-")
    if not sep:
        return None
    parsed = parse_number(layer, MAX_COUNT), parse_number(ino, MAX_INO)
    return None if parsed[0] is None or parsed[1] is None else (parsed[0], parsed[1])


class Expect(Enum):
    """What a pending link-count change expects to find at its path once it has happened."""

    #: the name is a hard link to the index entry (a lower name linked into the upper)
    LINKED = "linked"
    #: the upper holds something at the name (a whiteout, or another object renamed over it)
    PRESENT = "present"


@dataclass(frozen=True, slots=True)
class Pending:
    """A change of an index entry's :data:`XATTR_LOWER_LINKS` from ``old`` to ``new`` that takes
    effect with one change of the upper at ``path`` (components below the upper root)."""

    new: int
    old: int
    expect: Expect
    path: tuple[str, ...]


def format_pending(pending: Pending) -> bytes:
    return os.fsencode(f"{pending.new} {pending.old} {pending.expect.value} "
                       + "/".join(pending.path))


def parse_pending(value: bytes) -> Pending | None:
    """A pending record, or None when it is malformed (then it is ignored: the count stays)."""
    fields = os.fsdecode(value).split(" ", 3)
    if len(fields) != 4:
        return None
    new, old = parse_number(fields[0], MAX_COUNT), parse_number(fields[1], MAX_COUNT)
    try:
        expect = Expect(fields[2])
    except ValueError:
        return None
    path = tuple(fields[3].split("/"))
    if new is None or old is None or any(p in ("", ".", "..") for p in path):
        return None
    return Pending(new, old, expect, path)


# --- user-visible xattr names -------------------------------------------------------------------


def _private_prefix(name: str) -> str | None:
    for prefix in OVERLAY_PREFIXES:
        if name.startswith(prefix):
            return prefix
    return None


def escape_xattr(name: str) -> str:
    """The name under which a user's xattr is stored in a layer.

    ``user.overlay.foo`` becomes ``user.overlay.overlay.foo`` (and likewise for ``trusted``), so a
    user's attribute can never be mistaken for layer metadata.
    """
    prefix = _private_prefix(name)
    if prefix is None:
        return name
    return prefix + "overlay." + name[len(prefix) :]


def origin_xattr(mode: int) -> str:
    """Where an object of this type records its origin: ``user.*`` where the kernel allows it."""
    return XATTR_ORIGIN if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else XATTR_ORIGIN_TRUSTED


def unescape_xattr(stored: str) -> str | None:
    """The user-visible name of a stored xattr, or None when it is layer metadata to hide."""
    if stored.startswith((COWFS_PREFIX, TRUSTED_COWFS_PREFIX)):
        return None
    prefix = _private_prefix(stored)
    if prefix is None:
        return stored
    rest = stored[len(prefix) :]
    if rest.startswith("overlay."):
        return prefix + rest[len("overlay.") :]
    return None


def is_reserved_xattr(name: str) -> bool:
    """Names users may not set or remove through the mount: cowfs's own namespace."""
    return name.startswith((COWFS_PREFIX, TRUSTED_COWFS_PREFIX))


def is_copied_on_copy_up(stored: str) -> bool:
    """Copy-up copies a user's xattrs (escaped ones included) but never the layer's metadata."""
    return unescape_xattr(stored) is not None


# --- the work directory's place, the mount state file, the recorded lower stack -----------------
# (Read by the offline tools as well as written by the daemon: one definition for both.)


def default_work_dir(upper: Path) -> Path:
    """Where the work directory is when ``--work`` is not given: hidden inside the upper."""
    return upper / WORK_DIR_NAME


#: A running mount's state file: ``STATE_DIR/<quoted mountpoint>.json`` holding one
#: :class:`MountState` as a JSON object (see :mod:`cowfs.core.mounts` for the directory).
STATE_FILE_SUFFIX = ".json"


@dataclass(frozen=True, slots=True)
class MountState:
    """What a running daemon tells ``cowfs umount``, ``cowfs status`` and the offline tools."""

    pid: int
    mountpoint: str
    #: Absolute, symlink-free paths, topmost lower first.
    lowers: tuple[str, ...]
    upper: str
    work: str
    #: Set by a daemon that ended with an error; a clean exit removes the state file instead.
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "mountpoint": self.mountpoint,
                           "lowers": list(self.lowers), "upper": self.upper, "work": self.work,
                           "error": self.error})

    @classmethod
    def from_json(cls, text: str) -> MountState:
        """Parse a state file; ValueError when it is not one."""
        try:
            data = json.loads(text)
            lowers = data["lowers"]
            state = cls(int(data["pid"]), str(data["mountpoint"]),
                        tuple(str(p) for p in lowers), str(data["upper"]), str(data["work"]),
                        None if data.get("error") is None else str(data["error"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a cowfs state file: {e}") from None
        if not isinstance(lowers, list):
            raise ValueError("not a cowfs state file: lowers is not a list")
        return state


#: On the upper root: the lower stack the upper was made on, written at each read-write mount
#: (see :class:`StackRecord`). Origins, redirects and the index only mean something over it.
XATTR_STACK = COWFS_PREFIX + "stack"
#: On the upper root while a commit of it is unfinished: which base, and which plan (see
#: :class:`CommitMark`; the commit's journal is in that base, see :mod:`cowfs.tools.journal`). Such
#an
#: upper is not mounted, and only the journal this mark names is ever resumed.
XATTR_COMMITTING = COWFS_PREFIX + "committing"
#: On a work directory given with ``--work``: ``<dev>:<ino>`` of the root of the upper it serves,
#: written by the mount (:mod:`cowfs.core.workdir`). The offline commands empty and read a recorded
#: ``--work`` directory only when it carries the mark of their upper (:mod:`cowfs.core.upperinfo`),
#as
#: the kernel verifies its index directory's ``overlay.upper`` against the upper root.
XATTR_WORK_UPPER = COWFS_PREFIX + "upper"
#: Version of the stack record's JSON.
STACK_RECORD_VERSION = 1
#: Version of the commit mark's JSON.
COMMIT_MARK_VERSION = 1
#: The largest stack record written (the smallest xattr value limit of common filesystems,
#: ext4's 4 KiB block less its headers); a longer one is refused at mount with a clear error.
STACK_RECORD_MAX = 3800
#: The largest record read from an xattr or a journal file: anything longer was not written by
#: cowfs (a plan is longer, and has its own limit in :mod:`cowfs.tools.journal`).
RECORD_READ_MAX = 64 * 1024

#: msgspec decodes integers up to 64 bits and refuses larger ones (and floats such as 1e400).
_Ino = Annotated[int, msgspec.Meta(ge=0)]


def is_plain_absolute(path: str) -> bool:
    """An absolute path as :meth:`pathlib.Path.resolve` gives it: ``/``, or ``/`` followed by
    components that are neither empty, ``.`` nor ``..``, without NUL bytes."""
    if not path.startswith("/") or "\0" in path:
        return False
    return path == "/" or all(p not in ("", ".", "..") for p in path[1:].split("/"))


def is_plain_relative(path: str) -> bool:
    """A path below a layer root: components that are neither empty, ``.`` nor ``..`` (so not
    absolute either), without NUL bytes."""
    return "\0" not in path and all(p not in ("", ".", "..") for p in path.split("/"))


def decode_record(value: bytes | str, kind: type[_T], what: str) -> _T:
    """Decode an untrusted JSON record of ``what`` into the wire type ``kind`` (a
    :class:`msgspec.Struct`): anything that does not fit it (a missing or unknown field, a wrong
    type, a number out of range, nesting where none belongs) is a ValueError of one line."""
    if len(value) > RECORD_READ_MAX:
        raise ValueError(f"malformed {what}: {len(value)} bytes")
    try:
        return msgspec.json.decode(value, type=kind, strict=True)
    except (msgspec.DecodeError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"malformed {what}: {reason}") from None


@dataclass(frozen=True, slots=True)
class LayerIdentity:
    """A lower layer as recorded: its absolute path and the identity of its root directory.

    ``dev`` and ``ino`` change when the layer is copied or moved to another filesystem (a move
    within a filesystem keeps them, a path change then shows in ``path`` alone).
    """

    path: str
    dev: int
    ino: int


class _LayerJSON(msgspec.Struct, forbid_unknown_fields=True):
    path: str
    dev: _Ino
    ino: _Ino


class _StackJSON(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    lowers: list[_LayerJSON]
    work: str | None = None


@dataclass(frozen=True, slots=True)
class StackRecord:
    """The lower stack (topmost first) an upper was made on: ``user.cowfs.stack``, JSON
    ``{"version": 1, "lowers": [{"path": "/abs", "dev": 2049, "ino": 1234}, ...],
    "work": "/abs" or null}``; no other field, paths absolute and free of ``.``, ``..`` and
    empty components, ``dev`` and ``ino`` within 64 bits."""

    lowers: tuple[LayerIdentity, ...]
    #: The work directory of the mount when it was not the default one (``--work``), whose
    #: hard-link index the offline tools read, and empty, only when it carries
    #: :data:`XATTR_WORK_UPPER` naming this upper; None for the default.
    work: str | None = None

    def to_json(self) -> bytes:
        return msgspec.json.encode(_StackJSON(
            STACK_RECORD_VERSION, [_LayerJSON(i.path, i.dev, i.ino) for i in self.lowers],
            self.work))

    @classmethod
    def from_json(cls, value: bytes) -> StackRecord:
        """Parse an (untrusted) record; ValueError says why it is refused."""
        data = decode_record(value, _StackJSON, "stack record")
        if data.version != STACK_RECORD_VERSION:
            raise ValueError(f"unknown stack record version {data.version!r}")
        if any(i.dev > MAX_INO or i.ino > MAX_INO for i in data.lowers):
            raise ValueError("malformed stack record: a device or inode number beyond 64 bits")
        if not data.lowers or any(not is_plain_absolute(i.path) for i in data.lowers):
            raise ValueError("malformed stack record: no lowers, or a path that is not a plain "
                             "absolute path")
        if data.work is not None and not is_plain_absolute(data.work):
            raise ValueError("malformed stack record: the work directory is not a plain "
                             "absolute path")
        return cls(tuple(LayerIdentity(i.path, i.dev, i.ino) for i in data.lowers), data.work)


class _CommitMarkJSON(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    base: str
    plan: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


@dataclass(frozen=True, slots=True)
class CommitMark:
    """An unfinished commit of the upper: ``user.cowfs.committing``, JSON ``{"version": 1,
    "base": "/abs", "plan": "<sha256, hex>"}``: the base committed into, and the SHA-256 of the
    journal's ``plan.json`` written there. A journal in BASE is resumed only when its digest is
    the one its upper recorded before writing it."""

    base: str
    plan: str

    def to_json(self) -> bytes:
        return msgspec.json.encode(_CommitMarkJSON(COMMIT_MARK_VERSION, self.base, self.plan))

    @classmethod
    def from_json(cls, value: bytes) -> CommitMark:
        """Parse an (untrusted) mark; ValueError says why it is refused."""
        data = decode_record(value, _CommitMarkJSON, "commit mark")
        if data.version != COMMIT_MARK_VERSION:
            raise ValueError(f"unknown commit mark version {data.version!r}")
        if not is_plain_absolute(data.base):
            raise ValueError("malformed commit mark: the base is not a plain absolute path")
        return cls(data.base, data.plan)


def format_work_upper(dev: int, ino: int) -> bytes:
    """The value of :data:`XATTR_WORK_UPPER` for the upper root ``dev``/``ino``."""
    return f"{dev}:{ino}".encode()
