"""What may block the request loop: the bound on work a handler does inline (issue 18).

Handing a call to a worker thread and back costs about 100-150 µs of CPU on the benchmark machine
(docs/performance.md), more than most namespace changes cost themselves (an ``unlinkat``, a
``renameat2``, the copy-up of a small file). So the adapter (:mod:`cowfs.daemon.operations`) runs
those
inline, on the loop that serves every request, and keeps worker threads for what may take long:
copying much data, and anything that reads a layer that is not on a local block device (a network
or FUSE lower can take any time), during which the loop would serve nothing else.

Whether a change copies data, and how much, is decided deep in the copy-up; the adapter cannot know
it before. So an inline call runs under :func:`on_loop`, and the one place that copies data
(:func:`cowfs.core.realfs.copy_bytes`, :func:`cowfs.core.realfs.copy_range`) asks :func:`check_copy`
first: a copy of more than :data:`COPY_MAX` bytes, or from a filesystem that is not a local block
device, raises :class:`TooLongError` instead of starting. A clone (:func:`cowfs.core.realfs.clone`:
a reflink moves no data, whatever the file's size) is made inline on a local block device
(:func:`check_clone`): the copy-up of a large file on XFS or Btrfs needs no worker thread. That is
an ``OSError``, raised where any failing copy would raise: the copy-up discards what it built, as
for ``ENOSPC`` (the fault-injection tests prove every such failure leaves nothing visible changed),
and the adapter runs the whole operation again in a worker thread.

Known limits: an inline change still waits for what the upper's filesystem makes it wait for (the
``fsync`` that ends the copy-up of a small file, a lock of the journal, freeing the blocks of a
large upper file that is deleted); and the rule "local block
device" is the one :meth:`cowfs.daemon.handles.FileHandle.read_local` uses (an anonymous device
means tmpfs, FUSE, NFS, ...), so a copy-up from a tmpfs lower always takes a thread.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Iterator

from .libc import fs_type

#: The most file data a copy inline may move. A copy is a read and a write of that many bytes:
#: the bound is the one for inline reads (``operations.INLINE_READ_MAX``: a cold 64 KiB read from
#: the local disk costs about what a thread hand-off does), and it covers most source files (the
#: benchmark's median is 3.7 KiB) and small config files, the copy-ups that are many.
COPY_MAX = 64 << 10


class TooLongError(OSError):
    """A copy too long to make on the request loop: run the operation in a worker thread."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EWOULDBLOCK, why)


_state = threading.local()


@contextlib.contextmanager
def on_loop() -> Iterator[None]:
    """Mark the calling thread as the request loop for the duration of one handler's work."""
    _state.active = True
    try:
        yield
    finally:
        _state.active = False


#: Filesystems on a local block device whose files have anonymous device numbers (major 0) all
#: the same: Btrfs numbers each subvolume so.
_LOCAL_ANONYMOUS = frozenset({0x9123683E})

#: What :func:`is_local` found of each anonymous device number (one ``fstatfs`` per device).
_anonymous: dict[int, bool] = {}


def is_local(fd: int) -> bool:
    """Whether the file behind ``fd`` is on a local block device: a device number with a major
    number, or a Btrfs subvolume's anonymous one (not tmpfs, FUSE, NFS or another anonymous
    device)."""
    dev = os.fstat(fd).st_dev
    if os.major(dev) != 0:
        return True
    local = _anonymous.get(dev)
    if local is None:
        local = _anonymous[dev] = fs_type(fd) in _LOCAL_ANONYMOUS
    return local


def check_clone(src: int) -> None:
    """Raise :class:`TooLongError` if a clone of ``src``'s data must not be made here: a clone
    moves no data, so its size does not matter, but one on a filesystem that is not a local block
    device (NFS clones too) may take any time."""
    if getattr(_state, "active", False) and not is_local(src):
        raise TooLongError("a clone on a filesystem that is not a local block device")


def check_copy(src: int, size: int) -> None:
    """Raise :class:`TooLongError` if a copy of ``size`` bytes from ``src`` must not run here."""
    if not getattr(_state, "active", False):
        return
    if size > COPY_MAX:
        raise TooLongError(f"a copy of {size} bytes")
    if size and not is_local(src):
        raise TooLongError("a copy from a filesystem that is not a local block device")
