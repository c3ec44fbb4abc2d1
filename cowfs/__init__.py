"""cowfs: a copy-on-write overlay filesystem for Linux, on pyfuse3 and trio.

The kernel's overlayfs is the reference for every semantic question; the on-disk layer format is
specified in docs/layer-format.md and implemented in :mod:`cowfs.core.schema`.

The Python API (:mod:`cowfs.tools.api`): ``with cowfs.overlay(base) as view:`` mounts a writable
copy-on-write view of ``base`` at ``view.path``; ``view.diff()``, ``view.commit()`` and
``view.discard()`` work on its changes. It is unmounted on leaving the block.

The API's names are loaded on first use (PEP 562), so that importing the package (as the daemon
and every submodule do) does not import the API and the layer walk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .core.errors import CowfsError
    from .tools.api import View, overlay

__all__ = ["CowfsError", "View", "overlay"]

_LAZY = {"View": "tools.api", "overlay": "tools.api", "CowfsError": "core.errors"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
