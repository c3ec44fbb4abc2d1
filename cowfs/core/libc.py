"""The C library: the one ``ctypes`` handle cowfs has on it, for the calls Python's ``os`` module
lacks (:mod:`cowfs.core.realfs` wraps most of them; ``daemon/mount.py`` and ``tools/private.py``
call it too), and what is asked of it below every other module: a filesystem's type.

``argtypes`` set on the handle hold for every user of it.
"""

from __future__ import annotations

import ctypes
import sys

libc = ctypes.CDLL(None, use_errno=True)

_fstatfs = libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


def fs_type(fd: int) -> int:
    """``f_type`` of the filesystem of ``fd`` (``fstatfs``; an ``O_PATH`` descriptor will do);
    0 where it cannot be told."""
    buf = ctypes.create_string_buffer(256)  # struct statfs, f_type first
    if _fstatfs(fd, buf) != 0:
        return 0
    return int.from_bytes(buf.raw[0:ctypes.sizeof(ctypes.c_long)], sys.byteorder) & 0xFFFFFFFF
