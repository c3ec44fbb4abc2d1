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
The precise specification is docs/layer-format.md; this module and that page must agree.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import Enum

FORMAT_VERSION = b"1"

#: Default name of the work directory inside the upper; hidden at the root of every layer.
WORK_DIR_NAME = ".cowfs-work"
#: The directory inside the work directory where objects are built before being renamed into place.
#: Nothing else in the work directory is ever written or removed.
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
XATTR_FORMAT = COWFS_PREFIX + "format"
#: On an upper object copied up from a lower one: ``"<layer>:<inode>"`` of that lower object, so
#: that the object keeps its inode number after copy-up and across mounts.
XATTR_ORIGIN = COWFS_PREFIX + "origin"
XATTR_ORIGIN_TRUSTED = TRUSTED_COWFS_PREFIX + "origin"
#: On a hard-link index entry: the number of names the object has in the merged view (decimal).
XATTR_NLINK = COWFS_PREFIX + "nlink"

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


def format_origin(layer_index: int, ino: int) -> bytes:
    return f"{layer_index}:{ino}".encode()


def parse_origin(value: bytes) -> tuple[int, int] | None:
    """``(layer index, inode)`` of an origin xattr, or None if it is malformed."""
    layer, sep, ino = value.partition(b":")
    if not sep or not layer.isdigit() or not ino.isdigit():
        return None
    return int(layer), int(ino)


def index_name(layer_index: int, ino: int) -> str:
    return f"{layer_index}-{ino}"


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
