"""Extended attributes as users see them through the mount (the kernel's fs/overlayfs/xattrs.c).

Layer metadata (``user.overlay.*``, ``trusted.overlay.*``) and cowfs's own ``user.cowfs.*`` are
never listed or readable; a user's own attribute with an overlay prefix is stored escaped (see
:func:`cowfs.core.schema.escape_xattr`). Setting or removing an attribute copies the object up first
(a regular file without its data: :mod:`cowfs.core.metacopy`).
"""

from __future__ import annotations

import errno
import stat

from ..core import realfs, schema
from .copyup import CopyUp
from .inodes import Inode
from .upperdata import Need


def _refuse_reserved(name: str) -> None:
    if schema.is_reserved_xattr(name):
        raise OSError(errno.EPERM, "reserved for cowfs", name)


#: The kernel asks for it before every write(2) to a FUSE file (to drop file capabilities), so a
#: log written in 4-byte appends costs one getxattr request per write. Its absence is remembered
#: per real object (``Inode.absent_on``): only a setxattr through cowfs, or a copy-up (a new real
#: object), can add it.
#: A setxattr runs in a worker thread while getxattrs go on on the loop: the inode counts xattr
#: changes, and an absence read before one is not remembered after it.
CAPABILITY = "security.capability"


def get_value(inode: Inode, name: str) -> bytes | None:
    """The value of the user's attribute ``name``; None when there is none (``ENODATA``: most
    answers of ``ls -l``, which asks two per file, and of every write's capability check, so
    they are a return, not an exception)."""
    if schema.is_reserved_xattr(name):
        return None
    top = inode.top
    if name == CAPABILITY and stat.S_ISREG(top.mode):
        return inode.xattr_unless_absent(top, CAPABILITY)  # not escaped: not an overlay name
    return top.getxattr(schema.escape_xattr(name))


def list_names(inode: Inode) -> list[str]:
    visible = (schema.unescape_xattr(n) for n in inode.top.listxattr())
    return [n for n in visible if n is not None]


def set_value(inode: Inode, name: str, value: bytes, copy_up: CopyUp) -> None:
    _refuse_reserved(name)
    upper = copy_up.ensure(inode, Need.METADATA)
    # Before and after: a getxattr on the loop between the two may have read the old absence.
    inode.xattrs_changed()
    try:
        realfs.setxattr(upper.fd, schema.escape_xattr(name), value)
    finally:
        inode.xattrs_changed()


def remove_value(inode: Inode, name: str, copy_up: CopyUp) -> None:
    _refuse_reserved(name)
    if inode.top.getxattr(schema.escape_xattr(name)) is None:
        raise OSError(errno.ENODATA, "no such attribute", name)
    upper = copy_up.ensure(inode, Need.METADATA)
    try:
        realfs.removexattr(upper.fd, schema.escape_xattr(name))
    finally:
        inode.xattrs_changed()
