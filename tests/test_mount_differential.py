"""Differential tests: the same steps on the kernel's overlayfs and on cowfs over identical layers
must give the same outcomes (values, or errno names) and the same merged view, and cowfs must show
the same again after a remount (so its upper layer alone carries what it showed).

The reference's options are support.KERNEL_DEFAULTS. Renames of directories with lower content
are tested in test_mount_identity.py; here only directories made through the mount are renamed."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from conftest import DEFAULT_LOWERS, DEFAULT_UPPER, LayerFactory
from support import (
    OPAQUE_TRUSTED,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    Dir,
    Spec,
    Step,
    Twin,
    Whiteout,
    kernel_overlay,
    run_steps,
)

pytestmark = pytest.mark.kernel

FILES = [
    "a.txt", "b.txt", "c.txt", "u.txt", "run.sh", "shadow", "dir/x", "dir/y", "dir/w", "dir/u",
    "dir/sub/z", "only0/f", "only1/f", "deep/er/est/file",
]  # fmt: skip
DIRS = [".", "dir", "dir/sub", "only0", "only1", "deep", "deep/er", "deep/er/est", "empty1"]


@dataclass(frozen=True)
class Scenario:
    name: str
    steps: list[Step]
    lowers: tuple[Spec, ...] = DEFAULT_LOWERS
    upper: Spec = field(default_factory=lambda: DEFAULT_UPPER)

    def __str__(self) -> str:
        return self.name


SCENARIOS = [
    Scenario(
        "read_everything",
        [
            *[("listdir", d) for d in DIRS],
            *[("read", f) for f in FILES],
            *[("stat", p) for p in FILES + DIRS + ["link"]],
            ("readlink", "link"),
            ("read", "link"),
            ("stat", "shadow/below"),
            ("listxattr", "a.txt"),
            ("getxattr", "a.txt", "user.none"),
        ],
    ),
    Scenario(
        "writes",
        [
            ("write", "a.txt", b"whole"),
            ("pwrite", "b.txt", 3, b"XYZ"),
            ("append", "dir/x", b"+tail"),
            ("truncate", "dir/y", 2),
            ("truncate", "only1/f", 100),
            ("write", "dir/sub/new", b"new"),
            ("write", "deep/er/est/file", b"deep"),
            ("append", "u.txt", b"+u"),
            ("pwrite", "run.sh", 1000, b"far"),
            *[("read", f) for f in FILES],
            *[("stat", f) for f in FILES],
        ],
    ),
    Scenario(
        "unlink_and_recreate",
        [
            ("unlink", "b.txt"),
            ("stat", "b.txt"),
            ("read", "b.txt"),
            ("write", "b.txt", b"again"),
            ("read", "b.txt"),
            ("unlink", "dir/x"),
            ("listdir", "dir"),
            ("unlink", "link"),
            ("unlink", "shadow"),
            ("listdir", "."),
            ("mkdir", "shadow"),
            ("listdir", "shadow"),
            ("unlink", "u.txt"),
            ("create", "u.txt"),
            ("read", "u.txt"),
        ],
    ),
    Scenario(
        "rmdir_rules",
        [
            ("rmdir", "dir"),
            ("rmdir", "only1"),
            ("rmdir", "deep"),
            *[("unlink", f"dir/{n}") for n in ("x", "y", "w", "u", "sub/z")],
            ("rmdir", "dir/sub"),
            ("listdir", "dir"),
            ("rmdir", "dir"),
            ("stat", "dir"),
            ("mkdir", "dir"),
            ("listdir", "dir"),
            ("rmdir", "empty1"),
            ("mkdir", "empty1"),
            ("listdir", "empty1"),
            ("rmtree", "deep"),
            ("mkdir", "deep"),
            ("listdir", "deep"),
            ("listdir", "."),
        ],
    ),
    Scenario(
        "rename_files",
        [
            ("rename", "b.txt", "b2.txt"),
            ("rename", "a.txt", "dir/a"),
            ("rename", "dir/x", "dir/y"),
            ("rename", "u.txt", "c.txt"),
            ("rename", "c.txt", "only1/c"),
            ("rename", "dir/y", "only0/f", RENAME_NOREPLACE),
            ("rename", "dir/y", "only0/g", RENAME_NOREPLACE),
            ("rename", "only0/f", "only1/f", RENAME_EXCHANGE),
            ("mkdir", "newdir"),
            ("rename", "run.sh", "newdir", RENAME_EXCHANGE),  # only with a directory made here
            ("rename", "link", "link2"),
            ("readlink", "link2"),
            ("rename", "shadow", "deep/er/shadow"),
            *[("listdir", d) for d in DIRS],
            *[("read", f) for f in ["b2.txt", "dir/a", "only1/c", "only0/f", "only1/f", "newdir"]],
            ("listdir", "run.sh"),
        ],
    ),
    Scenario(
        "rename_new_directories",
        [
            ("mkdir", "newd"),
            ("write", "newd/f", b"f"),
            ("rename", "newd", "dir/newd"),
            ("rename", "dir/newd", "newd2"),
            ("listdir", "newd2"),
            ("mkdir", "e1"),
            ("mkdir", "e2"),
            ("rename", "e1", "e2"),
            ("mkdir", "e3"),
            ("write", "e3/inside", b"i"),
            ("rename", "e3", "empty1"),
            ("listdir", "empty1"),
            ("mkdir", "e4"),
            ("rename", "e4", "only1"),
            ("listdir", "."),
        ],
    ),
    Scenario(
        "errors",
        [
            ("read", "missing"),
            ("mkdir", "dir"),
            ("create", "a.txt"),
            ("unlink", "dir"),
            ("rmdir", "a.txt"),
            ("rename", "dir", "a.txt"),
            ("rename", "a.txt", "dir"),
            ("link", "dir", "dlink"),
            ("rename", "dir", "dir/sub/inside"),
            ("symlink", "x", "a.txt"),
            ("mkdir", "a.txt/sub"),
            ("read", "dir"),
            ("rmdir", "missing"),
            ("rename", "missing", "m2"),
            ("link", "missing", "l"),
            ("truncate", "dir", 0),
            ("removexattr", "a.txt", "user.none"),
            ("getxattr", "dir", "user.none"),
            ("rename", "a.txt", "b.txt", RENAME_NOREPLACE | RENAME_EXCHANGE),
            ("rename", "missing", "a.txt", RENAME_EXCHANGE),
            ("stat", "a.txt/x"),
            ("unlink", "empty1"),
        ],
    ),
    Scenario(
        "links",
        [
            ("link", "b.txt", "b.link"),
            ("stat", "b.txt"),
            ("stat", "b.link"),
            ("append", "b.link", b"+via link"),
            ("read", "b.txt"),
            ("link", "u.txt", "dir/u.link"),
            ("symlink", "../a.txt", "dir/sym"),
            ("read", "dir/sym"),
            ("unlink", "b.txt"),
            ("stat", "b.link"),
            ("link", "run.sh", "only1/run2"),
            ("link", "link", "link.hard"),
            ("readlink", "link.hard"),
        ],
    ),
    Scenario(
        "attributes",
        [
            ("chmod", "a.txt", 0o600),
            ("chmod", "dir", 0o700),
            ("chown", "b.txt", 5, 6),
            ("chown", "link", 7, 8),
            ("chmod", "only1", 0o711),
            ("chmod", "deep/er/est/file", 0o4755),
            ("utime", "a.txt", 10**18 + 1, 10**18 + 2),
            ("utime", "dir", 10**18 + 3, 10**18 + 4),
            ("utime", "link", 10**18 + 5, 10**18 + 6),
            ("mtime", "a.txt"),
            ("mtime", "dir"),
            ("mtime", "link"),
            *[("stat", p) for p in ["a.txt", "dir", "b.txt", "link", "only1", "deep/er/est/file"]],
        ],
    ),
    Scenario(
        "xattrs",
        [
            ("setxattr", "a.txt", "user.a", b"1"),
            ("setxattr", "b.txt", "trusted.t", b"2"),
            ("setxattr", "dir", "user.d", b"3"),
            ("setxattr", "only1", "security.s", b"4"),
            ("listxattr", "a.txt"),
            ("listxattr", "b.txt"),
            ("listxattr", "dir"),
            ("getxattr", "dir", "user.d"),
            ("removexattr", "a.txt", "user.a"),
            ("listxattr", "a.txt"),
            ("removexattr", "a.txt", "user.a"),
            ("setxattr", "u.txt", "user.big", b"v" * 3000),
            ("getxattr", "u.txt", "user.big"),
        ],
    ),
    Scenario(
        "special_files",
        [
            ("mkfifo", "dir/fifo"),
            ("mknod", "dir/null", 0o20666, 1, 3),
            ("mknod", "dir/null", 0o20666, 1, 3),
            ("stat", "dir/fifo"),
            ("stat", "dir/null"),
            ("unlink", "dir/fifo"),
            ("listdir", "dir"),
        ],
    ),
    Scenario(
        "kernel_whiteout_forms_in_lowers",
        [
            ("stat", "gone"),
            ("listdir", "."),
            ("listdir", "d"),
            ("listdir", "op"),
            ("read", "op/new"),
            ("write", "gone", b"back"),
            ("read", "gone"),
            ("write", "d/gone", b"back"),
            ("listdir", "d"),
            ("unlink", "op/new"),
            ("rmdir", "op"),
            ("listdir", "."),
        ],
        lowers=(
            {
                "gone": Whiteout("chardev"),
                "d/gone": Whiteout("chardev"),
                "d/kept": None,
                "op/": Dir(xattrs=OPAQUE_TRUSTED),
                "op/new": None,
            },
            {"gone": None, "d/gone": None, "d/other": None, "op/old": None, "op/new": None},
        ),
        upper={},
    ),
    Scenario(
        "deep_copy_up",
        [
            ("write", "deep/er/est/file", b"deep"),
            ("listdir", "deep/er/est"),
            ("chmod", "deep/er", 0o700),
            ("stat", "deep/er"),
            ("rmtree", "deep"),
            ("stat", "deep"),
            ("listdir", "."),
        ],
    ),
    Scenario(
        "opaque_after_rmtree",
        [
            ("rmtree", "dir"),
            ("mkdir", "dir"),
            ("listdir", "dir"),
            ("write", "dir/x", b"new x"),
            ("mkdir", "dir/sub"),
            ("listdir", "dir"),
            ("listdir", "dir/sub"),
            ("read", "dir/x"),
        ],
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_scenario(make_twin, scenario: Scenario) -> None:
    twin = make_twin(*scenario.lowers, upper=scenario.upper)
    twin.apply(scenario.steps)
    twin.remount_and_compare()


# --- random sequences -------------------------------------------------------------------------
# File names never name a directory in any layer and directory names never name a file, so the
# only directory renames are of directories made through the mount.

RANDOM_FILES = ["a.txt", "b.txt", "c.txt", "u.txt", "dir/x", "dir/y", "dir/u", "only1/f", "n1"]
RANDOM_DIRS = ["d1", "dir/d2", "d1/d3"]
LISTED = [".", "dir", "only1", "d1", "dir/d2"]


def random_steps(seed: int, count: int) -> list[Step]:
    rng = random.Random(seed)
    f, d = (lambda: rng.choice(RANDOM_FILES)), (lambda: rng.choice(RANDOM_DIRS))
    makers = [
        (6, lambda: ("write", f(), f"w{rng.randrange(1000)}".encode())),
        (4, lambda: ("append", f(), b"+")),
        (5, lambda: ("read", f())),
        (4, lambda: ("unlink", f())),
        (4, lambda: ("rename", f(), f(), rng.choice([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))),
        (2, lambda: ("link", f(), f())),
        (2, lambda: ("chmod", f(), rng.choice([0o600, 0o644, 0o755]))),
        (2, lambda: ("setxattr", f(), "user.k", b"v")),
        (1, lambda: ("removexattr", f(), "user.k")),
        (2, lambda: ("truncate", f(), rng.randrange(8))),
        (3, lambda: ("mkdir", d())),
        (2, lambda: ("rmdir", d())),
        (1, lambda: ("rename", d(), d())),
        (1, lambda: ("symlink", f(), f())),
        (3, lambda: ("listdir", rng.choice(LISTED))),
        (3, lambda: ("stat", rng.choice(RANDOM_FILES + RANDOM_DIRS))),
    ]
    weights = [w for w, _ in makers]
    return [rng.choices(makers, weights)[0][1]() for _ in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_sequence(make_twin, seed: int) -> None:
    twin = make_twin(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)
    twin.apply(random_steps(seed, 80))
    twin.remount_and_compare()


# --- the oracle itself --------------------------------------------------------------------------


def test_the_comparison_catches_a_divergence(layers: LayerFactory) -> None:
    """Two kernel overlays over identical layers agree, until one of them is changed alone."""
    left = layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)
    right = layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)
    with (
        kernel_overlay(left.lowers, left.upper, left.work, left.mnt) as one,
        kernel_overlay(right.lowers, right.upper, right.work, right.mnt) as other,
    ):
        twin = Twin(one, other, ("left", "right"))
        twin.apply(SCENARIOS[0].steps)
        twin.remount_and_compare()
        assert run_steps(other.mnt, [("append", "dir/sub/z", b"!")]) == ["ok"]
        with pytest.raises(AssertionError, match="dir/sub/z"):
            twin.assert_same_view()
        with pytest.raises(AssertionError, match="outcomes differ"):
            twin.apply([("read", "dir/sub/z")])
