"""Directories a command creates to write into, and removes again when it fails.

Commands create the directories they write new output into, with missing parents, as
``mkdir -p`` would: ``import``'s DIR, the directory of ``export -o FILE``, ``run --upper DIR``
and ``run --at PATH`` (and the API's ``upper`` and ``at``). They never create what they read
(lower layers, the upper and the mountpoint of ``cowfs mount``, which must exist, as for
mount(8)). A command that fails or is refused removes what it created (empty directories only,
deepest first), so it leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from ..core.errors import CowfsError


def make_dirs(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; return those created, topmost first."""
    missing: list[Path] = []
    probe = Path(os.path.abspath(path))
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise CowfsError(f"{str(probe)!r} is not a directory, so {str(path)!r} cannot be "
                         "created")
    made: list[Path] = []
    try:
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            made.append(directory)
    except OSError as e:
        remove_dirs(made)
        raise CowfsError(f"cannot create {str(path)!r}: {e.strerror}") from None
    return made


def remove_dirs(made: Iterable[Path]) -> None:
    """Remove directories :func:`make_dirs` created, deepest first, where they are still empty."""
    for directory in sorted(made, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
