"""pytest plugin (entry point ``cowfs``): disposable writable views of dataset directories.

A test that asks for ``cowfs_view`` gets a :class:`cowfs.View` of the directory named by its
``@pytest.mark.cowfs_dataset(PATH)`` marker (or the ``cowfs_dataset`` ini option); it may write,
rename and delete there freely, the dataset is never modified, and the view is unmounted and its
changes thrown away when the test ends, whether it passed or not. ``cowfs_overlay(base, ...)`` is
the factory behind it, for tests that need several views or other options (the keyword arguments
of :func:`cowfs.overlay`). Relative dataset paths are taken from pytest's rootdir.

Mounting needs /dev/fuse and the right to mount FUSE filesystems (root, or fusermount3).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .tools.api import View

MARKER = "cowfs_dataset"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(MARKER, "dataset directory that the cowfs_view fixture overlays", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(path): the directory cowfs_view overlays")


@pytest.fixture
def cowfs_overlay() -> Iterator[Callable[..., View]]:
    """``cowfs_overlay(base, upper=None, **options) -> View``: views unmounted at teardown."""
    from .tools.api import overlay

    with contextlib.ExitStack() as stack:

        def start(base: Any, upper: Any = None, **options: Any) -> View:
            return stack.enter_context(overlay(base, upper, **options))

        yield start


@pytest.fixture
def cowfs_view(request: pytest.FixtureRequest, cowfs_overlay: Callable[..., View]) -> View:
    """A disposable writable view of the dataset directory named by the ``cowfs_dataset``
    marker or ini option."""
    marker = request.node.get_closest_marker(MARKER)
    dataset = str(marker.args[0]) if marker is not None and marker.args else \
        str(request.config.getini(MARKER))
    if not dataset:
        raise pytest.UsageError(f"cowfs_view needs a dataset: @pytest.mark.{MARKER}(PATH) or "
                                f"'{MARKER} = PATH' in the pytest configuration")
    path = Path(dataset)
    if not path.is_absolute():
        path = Path(request.config.rootpath) / path
    return cowfs_overlay(path)
