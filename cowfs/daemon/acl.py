"""POSIX ACLs of new objects: what a directory's default ACL gives an object made in it.

The kernel's FUSE applies ACLs itself when the daemon asks for it (``FUSE_CAP_POSIX_ACL``,
pyfuse3's ``Operations.enable_acl``): permission checks, the mode a new access ACL implies, and
S_ISGID dropped for a caller outside the file's group. What is left to the daemon is the object
it makes: in a directory with a default ACL, the new object takes that ACL (masked by the mode
asked for) in place of the caller's umask, as the kernel's ``posix_acl_create`` gives it. A real
filesystem does so by itself for an object made in the directory; cowfs builds some objects in
the work directory first (over a whiteout, or with another owner), and gives them the ACLs here.

The xattr format is the kernel's (``posix_acl_xattr_header`` and ``posix_acl_xattr_entry``,
little-endian): version 2, then (tag, permissions, id) per entry.
"""

from __future__ import annotations

import stat
import struct

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"

_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_VERSION = 2
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20


def _entries(value: bytes) -> list[list[int]]:
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise ValueError("not a POSIX ACL xattr")
    if _HEADER.unpack_from(value)[0] != _VERSION:
        raise ValueError("unknown POSIX ACL version")
    return [list(_ENTRY.unpack_from(value, offset))
            for offset in range(_HEADER.size, len(value), _ENTRY.size)]


def _value(entries: list[list[int]]) -> bytes:
    return _HEADER.pack(_VERSION) + b"".join(_ENTRY.pack(*entry) for entry in entries)


def inherit(default: bytes, mode: int) -> tuple[int, bytes | None]:
    """The mode and access ACL of an object made with ``mode`` in a directory whose default ACL
    is ``default`` (the kernel's ``posix_acl_create_masq``): each class's permissions are those
    of the ACL and of the mode together. The ACL is None where the mode says it all."""
    entries = _entries(default)
    extended = False
    group_obj = mask = None
    for entry in entries:
        tag = entry[0]
        if tag == USER_OBJ:
            entry[1] &= (mode >> 6) & 0o7
            mode &= (entry[1] << 6) | ~stat.S_IRWXU
        elif tag == OTHER:
            entry[1] &= mode & 0o7
            mode &= entry[1] | ~stat.S_IRWXO
        elif tag == GROUP_OBJ:
            group_obj = entry
        elif tag == MASK:
            mask = entry
            extended = True
        else:  # a named user or group
            extended = True
    chosen = mask if mask is not None else group_obj
    if chosen is not None:
        chosen[1] &= (mode >> 3) & 0o7
        mode &= (chosen[1] << 3) | ~stat.S_IRWXG
    return mode, _value(entries) if extended else None
