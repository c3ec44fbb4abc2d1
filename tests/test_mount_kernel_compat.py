"""The layer format against the kernel's overlayfs: an upper that cowfs wrote, stacked as a lower
under the kernel (``-o userxattr``), shows what cowfs showed; an upper that the kernel wrote,
stacked as a lower under cowfs, shows what the kernel showed; and a cowfs upper stacked under
cowfs again shows the same."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import DEFAULT_LOWERS, DEFAULT_UPPER, LayerFactory, MountFactory
from support import (
    Entry,
    Step,
    assert_same_tree,
    kernel_overlay,
    merged_view,
    run_steps,
)

pytestmark = pytest.mark.kernel

# A session that copies up, deletes (files, a directory, a whole merged tree), makes an opaque
# directory, renames across layers, and sets xattrs, including one a user may not know is special.
SESSION: list[Step] = [
    ("write", "a.txt", b"rewritten"),
    ("append", "dir/x", b"+appended"),
    ("chmod", "dir/y", 0o600),
    ("chown", "only1/f", 12, 34),
    ("unlink", "b.txt"),
    ("unlink", "dir/w"),
    ("rmdir", "empty1"),
    ("rmtree", "deep"),
    ("rmtree", "only0"),
    ("mkdir", "only0"),
    ("write", "only0/new", b"in an opaque dir"),
    ("rename", "c.txt", "only1/c"),
    ("rename", "u.txt", "dir/sub/u"),
    ("setxattr", "dir/x", "user.note", b"kept"),
    ("symlink", "dir/x", "newlink"),
    ("link", "a.txt", "a.hard"),
    ("mkfifo", "fifo"),
    ("mkdir", "fresh"),
    ("write", "fresh/f", b"fresh"),
]
USER_OVERLAY_XATTR: Step = ("setxattr", "run.sh", "user.overlay.mine", b"escaped")


def without_cowfs_xattrs(view: dict[str, Entry]) -> dict[str, Entry]:
    """The kernel does not know cowfs's own namespace (user.cowfs.*, on the upper root): it shows
    it like any user xattr. Everything else must match."""
    return {
        rel: dataclasses.replace(
            entry, xattrs=tuple(x for x in entry.xattrs if not x[0].startswith("user.cowfs."))
        )
        for rel, entry in view.items()
    }


def test_a_cowfs_upper_under_the_kernel(layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    layer_set = layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)
    # The work dir must not be in the upper: the kernel would show it as an ordinary directory.
    # The kernel refuses metacopy files in userxattr mode (EPERM: docs/layer-format.md §11a), so
    # an upper meant for the kernel is written with nometacopy.
    mount = mount_cowfs(layer_set, work=layer_set.work, options=["nometacopy"])
    outcomes = run_steps(mount.mnt, [*SESSION, USER_OVERLAY_XATTR])
    assert outcomes == ["ok"] * len(outcomes), outcomes
    cowfs_view = merged_view(mount.mnt)
    mount.stop()

    kernel_mnt = layer_set.root / "kernel"
    kernel_mnt.mkdir()
    stack = [layer_set.upper, *layer_set.lowers]
    with kernel_overlay(stack, None, None, kernel_mnt, ["userxattr"]) as kernel:
        kernel_view = without_cowfs_xattrs(merged_view(kernel.mnt))
    assert_same_tree(cowfs_view, kernel_view, "merged views", ("cowfs", "kernel"))


@pytest.mark.parametrize("xattr_mode", ["trusted", "userxattr"])
def test_a_kernel_upper_under_cowfs(
    layers: LayerFactory, mount_cowfs: MountFactory, xattr_mode: str
) -> None:
    reference = layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)
    options = ["userxattr"] if xattr_mode == "userxattr" else []
    # In trusted mode user.overlay.* is an ordinary name to the kernel, not to cowfs.
    steps = [*SESSION, USER_OVERLAY_XATTR] if xattr_mode == "userxattr" else SESSION
    with kernel_overlay(
        reference.lowers, reference.upper, reference.work, reference.mnt, options
    ) as kernel:
        outcomes = run_steps(kernel.mnt, steps)
        assert outcomes == ["ok"] * len(outcomes), outcomes
        kernel_view = merged_view(kernel.mnt)

    fresh = layers()
    mount = mount_cowfs(fresh, lowers=[reference.upper, *reference.lowers])
    assert_same_tree(kernel_view, merged_view(mount.mnt), "merged views", ("kernel", "cowfs"))


def test_a_cowfs_upper_under_cowfs(layers: LayerFactory, mount_cowfs: MountFactory) -> None:
    first = layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)
    mount = mount_cowfs(first, work=first.work)
    run_steps(mount.mnt, [*SESSION, USER_OVERLAY_XATTR])
    view = merged_view(mount.mnt)
    mount.stop()
    second = layers()
    stacked = mount_cowfs(second, lowers=[first.upper, *first.lowers])
    assert_same_tree(view, merged_view(stacked.mnt), "merged views", ("cowfs", "stacked cowfs"))
