"""Fixtures for the real-mount tests (tests/test_mount_*.py): layers, cowfs mounts, twins.

Every fixture that mounts also unmounts in its teardown, whether the test passed or not, and the
cowfs fixtures check there that the lower layers were not modified (tree_state before == after,
ctime included) and that the layer is sound: the offline ``cowfs check`` finds nothing and the work
directory's tmp/ is empty (support.layer_problems; s3ql runs fsck after every test the same way).
A test that builds a broken or hostile layer on purpose opts out with
``@pytest.mark.layer_check(False, reason="...")``. The helpers behind the fixtures are in
support.py, importable without pytest.

Choosing layers: ``@pytest.mark.layers(lower0_spec, lower1_spec, ..., upper=spec, options=(...),
public=False)`` sets what the ``cowfs`` and ``twin`` fixtures mount (topmost lower first); without
it they mount DEFAULT_LOWERS and DEFAULT_UPPER. Tests that need something else build it with the
``layers`` factory and mount it with ``mount_cowfs``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import (
    CowfsMount,
    File,
    KernelOverlay,
    Spec,
    Twin,
    assert_same_tree,
    build_layer,
    find_cowfs,
    layer_check_disabled,
    layer_check_enabled,
    needs_root,
    tree_state,
)

# Bottom layer: lower1; top lower: lower0. Every default file's content is "<layer>:<path>".
DEFAULT_LOWERS: tuple[Spec, ...] = (
    {
        "a.txt": None,
        "dir/y": None,
        "dir/w": None,
        "only0/f": None,
        "shadow": None,  # a file over lower1's directory of the same name: hides it
        "c.txt": None,
        "run.sh": File(mode=0o755),
    },
    {
        "a.txt": None,
        "b.txt": None,
        "dir/x": None,
        "dir/y": None,
        "dir/sub/z": None,
        "only1/f": None,
        "shadow/below": None,
        "link@": "a.txt",
        "deep/er/est/file": None,
        "empty1/": None,
    },
)
DEFAULT_UPPER: Spec = {"u.txt": None, "dir/u": None}


MOUNTS = pytest.StashKey[list[CowfsMount]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that mounted cowfs shows each mount's command line and output."""
    report = yield
    if report.failed:
        for mount in item.stash.get(MOUNTS, []):
            report.sections.append((f"cowfs at {mount.mnt}", mount.describe()))
    return report


def pytest_runtest_setup(item: pytest.Item) -> None:
    """As a plain user (scripts/test-as-user.sh), tests that compare with the kernel's overlayfs
    skip: mounting it needs root."""
    if item.get_closest_marker("kernel") is not None:
        needs_root("compares with the kernel's overlayfs (mount -t overlay)")


#: Set for the session unless given: every cowfs the tests start keeps its state files (and a
#: background daemon its default log) there, so that mounts elsewhere on the machine (another
#: session's, a user's) are not seen by the commands under test (docs/cli.md, "State files").
_STATE_DIR_ENV = "COWFS_STATE_DIR"
_made_state_dir: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get(_STATE_DIR_ENV):
        _made_state_dir.append(tempfile.mkdtemp(prefix="cowfs-test-state-"))
        os.environ[_STATE_DIR_ENV] = _made_state_dir[0]
    config.addinivalue_line(
        "markers",
        "layers(*lower_specs, upper=None, options=(), public=False): what the cowfs and twin "
        "fixtures mount",
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    for made in _made_state_dir:
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture(autouse=True)
def _layer_check_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    """``@pytest.mark.layer_check(False, reason=...)`` turns the layer check off for every mount
    of the test (fixtures and support.cowfs_mount alike); the reason is required."""
    marker = request.node.get_closest_marker("layer_check")
    if marker is None or (marker.args[0] if marker.args else True):
        yield
        return
    reason = marker.kwargs.get("reason")
    if not reason:
        raise pytest.UsageError(f"{request.node.nodeid}: layer_check(False) needs a reason=")
    with layer_check_disabled(reason):
        yield


@dataclass(slots=True)
class LayerSet:
    """Directories for one mount: lowers (topmost first), upper, a spare work dir, a mount point."""

    root: Path
    lowers: list[Path]
    upper: Path
    work: Path
    mnt: Path


class LayerFactory:
    def __init__(self, base: Path) -> None:
        self._base = base
        self._count = 0
        self._public_dirs: list[Path] = []

    def __call__(
        self, *lower_specs: Spec, upper: Spec | None = None, public: bool = False
    ) -> LayerSet:
        """Build a fresh LayerSet; ``public`` puts the mount point where any user can reach it
        (pytest's own tmp directories are private to root)."""
        root = self._base / f"set{self._count}"
        self._count += 1
        lowers = [
            build_layer(root / f"lower{i}", spec, f"lower{i}") for i, spec in enumerate(lower_specs)
        ]
        upper_dir = build_layer(root / "upper", upper or {}, "upper")
        work = root / "work"
        work.mkdir()
        if public:
            pub = Path(tempfile.mkdtemp(prefix="cowfs-test-"))
            pub.chmod(0o755)
            self._public_dirs.append(pub)
            mnt = pub / "mnt"
        else:
            mnt = root / "mnt"
        mnt.mkdir()
        return LayerSet(root, lowers, upper_dir, work, mnt)

    def cleanup(self) -> None:
        # rmdir, never rmtree: should a mount have survived, rmtree would delete through it.
        for pub in self._public_dirs:
            with contextlib.suppress(OSError):
                (pub / "mnt").rmdir()
                pub.rmdir()


@pytest.fixture(scope="session")
def cowfs_cmd() -> Path:
    try:
        return find_cowfs()
    except AssertionError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[LayerFactory]:
    factory = LayerFactory(tmp_path)
    yield factory
    factory.cleanup()


MountFactory = Callable[..., CowfsMount]


def watchdog_seconds(request: pytest.FixtureRequest) -> float:
    """How long a test may wait on a mount before its FUSE connection is aborted: its
    pytest-timeout less a margin for teardown."""
    marker = request.node.get_closest_marker("timeout")
    if marker is not None and marker.args:
        total = float(marker.args[0])
    else:
        try:
            total = float(request.config.getoption("timeout") or request.config.getini("timeout"))
        except (ValueError, TypeError):
            total = 120.0
    return max(total - 20.0, 10.0)


@pytest.fixture
def mount_cowfs(
    request: pytest.FixtureRequest, layers: LayerFactory, cowfs_cmd: Path
) -> Iterator[MountFactory]:
    """``mount_cowfs(layer_set, options=(), work=None, foreground=True, lowers=None, mnt=None,
    env=None)`` (``env``: extra environment of the daemon):
    a started mount (``lowers`` and ``mnt`` override the layer set's). At teardown every mount is
    stopped (clean exit checked), its layer checked (``CowfsMount.check_layer``) and its lowers
    compared with their state before the mount."""
    with contextlib.ExitStack() as stack:

        def start(
            layer_set: LayerSet,
            *,
            options: Sequence[str] = (),
            work: Path | None = None,
            foreground: bool = True,
            lowers: Sequence[Path] | None = None,
            mnt: Path | None = None,
            env: Mapping[str, str] | None = None,
        ) -> CowfsMount:
            lower_dirs = list(lowers if lowers is not None else layer_set.lowers)
            before = {p: tree_state(p) for p in lower_dirs}
            mount = CowfsMount(
                lower_dirs,
                layer_set.upper,
                mnt or layer_set.mnt,
                work=work,
                options=options,
                foreground=foreground,
                command=cowfs_cmd,
                log_dir=layer_set.root,
                watchdog=watchdog_seconds(request),
                env=env,
            )
            stack.callback(_check_lowers, before)
            stack.callback(_check_layer, mount)
            stack.callback(mount.stop)
            request.node.stash.setdefault(MOUNTS, []).append(mount)
            mount.start()
            return mount

        yield start


def _check_layer(mount: CowfsMount) -> None:
    # A mount that never came up (a test expecting the mount to be refused) changed nothing.
    if layer_check_enabled() and mount.was_mounted and not mount.mounted:
        mount.check_layer()


def _check_lowers(before: dict[Path, Any]) -> None:
    for path, state in before.items():
        assert_same_tree(state, tree_state(path), f"lower layer {path}")


def _marker_args(request: pytest.FixtureRequest) -> tuple[tuple[Spec, ...], dict[str, Any]]:
    marker = request.node.get_closest_marker("layers")
    if marker is None:
        return DEFAULT_LOWERS, {"upper": DEFAULT_UPPER}
    return marker.args, dict(marker.kwargs)


@pytest.fixture
def cowfs(
    request: pytest.FixtureRequest, layers: LayerFactory, mount_cowfs: MountFactory
) -> CowfsMount:
    """A started cowfs mount of the layers named by the ``layers`` marker (or the defaults)."""
    specs, kwargs = _marker_args(request)
    layer_set = layers(*specs, upper=kwargs.get("upper"), public=kwargs.get("public", False))
    return mount_cowfs(layer_set, options=kwargs.get("options", ()))


@pytest.fixture
def make_twin(layers: LayerFactory, mount_cowfs: MountFactory) -> Iterator[Callable[..., Twin]]:
    """``make_twin(*lower_specs, upper=None)``: the same layers built twice, one copy under the
    kernel's overlayfs, the other under cowfs."""
    with contextlib.ExitStack() as stack:

        def start(*lower_specs: Spec, upper: Spec | None = None) -> Twin:
            ref = layers(*lower_specs, upper=upper)
            kernel = KernelOverlay(ref.lowers, ref.upper, ref.work, ref.mnt)
            kernel.start()
            stack.callback(kernel.stop)
            subject = mount_cowfs(layers(*lower_specs, upper=upper))
            return Twin(kernel, subject)

        yield start


@pytest.fixture
def twin(request: pytest.FixtureRequest, make_twin: Callable[..., Twin]) -> Twin:
    """Kernel overlay and cowfs over identical layers (``layers`` marker, or the defaults)."""
    specs, kwargs = _marker_args(request)
    return make_twin(*specs, upper=kwargs.get("upper"))
