"""File attributes: the ``chattr``/``lsattr`` flags and the ``fsxattr`` of an object.

The kernel's FUSE implements ``fileattr_get``/``fileattr_set`` (the ``FS_IOC_GETFLAGS``,
``FS_IOC_SETFLAGS``, ``FS_IOC_FSGETXATTR`` and ``FS_IOC_FSSETXATTR`` ioctls, ``chattr``,
``lsattr``, ``xfs_io -c lsattr``) by sending these four ioctls to the server, on a handle it opens
for the purpose (a directory's with ``FUSE_IOCTL_DIR``). cowfs answers them from the real object,
as the kernel's overlayfs does: reading from the topmost copy, and setting on the upper copy after
copying the object up. No other ioctl is passed to a real file.

Known limits (docs/filesystems.md, "Calls beyond read and write"): the kernel's overlayfs keeps
the immutable and append-only flags in an ``overlay.protattr`` xattr instead of on the upper
inode; cowfs sets them on the upper inode itself, which needs ``CAP_LINUX_IMMUTABLE`` there.
"""

from __future__ import annotations

import errno
import fcntl
import os

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F
FS_IOC_FSSETXATTR = 0x401C5820

#: How a real object is opened to ask or change its attributes: never for writing, never blocking.
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY

#: The commands that read, with the size of their argument as the kernel's FUSE passes it (the
#: flags are an ``int``, although the command number says ``long``; ``struct fsxattr`` is 28).
GET_SIZES = {FS_IOC_GETFLAGS: 4, FS_IOC_FSGETXATTR: 28}
#: The commands that change, with the size of their argument.
SET_SIZES = {FS_IOC_SETFLAGS: 4, FS_IOC_FSSETXATTR: 28}


def check_set(cmd: int, arg: bytes) -> None:
    """Refuse anything but one of the two setting commands with an argument of its size."""
    size = SET_SIZES.get(cmd)
    if size is None:
        raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} is not passed on")
    if len(arg) != size:
        raise OSError(errno.EINVAL, f"ioctl {cmd:#x}: argument of {len(arg)} bytes")


def get(fd: int, cmd: int, size: int) -> bytes:
    """The answer of a reading command on an open real object, at most ``size`` bytes."""
    wanted = GET_SIZES.get(cmd)
    if wanted is None:
        raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} is not passed on")
    buf = bytearray(max(wanted, 8))  # room for a long, whatever the filesystem writes
    fcntl.ioctl(fd, cmd, buf, True)
    return bytes(buf[:min(size, wanted)])
