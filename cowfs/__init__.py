"""cowfs: a copy-on-write overlay filesystem for Linux, on pyfuse3 and trio.

The kernel's overlayfs is the reference for every semantic question; the on-disk layer format is
specified in docs/layer-format.md and implemented in :mod:`cowfs.schema`.

The Python API (:mod:`cowfs.api`): ``with cowfs.overlay(base) as view:`` mounts a writable
copy-on-write view of ``base`` at ``view.path``; ``view.diff()``, ``view.commit()`` and
``view.discard()`` work on its changes. It is unmounted on leaving the block.
"""

__version__ = "0.1.0"

from .api import View, overlay
from .errors import CowfsError

__all__ = ["CowfsError", "View", "overlay"]
