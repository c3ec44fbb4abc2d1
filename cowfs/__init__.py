"""cowfs: a copy-on-write overlay filesystem for Linux, on pyfuse3 and trio.

The kernel's overlayfs is the reference for every semantic question; the on-disk layer format is
specified in docs/layer-format.md and implemented in :mod:`cowfs.schema`.
"""

__version__ = "0.1.0"
