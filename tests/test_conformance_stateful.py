"""Random operation sequences on random layers, run in lockstep on the kernel's overlayfs and cowfs.

hypothesis's stateful testing generates a layered fixture (1-3 lower layers of files, directories,
symlinks, hard links, sparse files, whiteouts, opaque directories and user xattrs) and a sequence
of steps. Each step runs on both mounts (over two copies of the same layers); after each, the
outcomes (value or errno), the merged views (names, types, modes, owners, sizes, contents, link
targets, user xattrs, nlink of non-directories, deterministic mtimes) and the lower layers (must
be unchanged) are compared. A failure prints the fixture and the steps as tuples: paste them into
tests/test_conformance_regressions.py.

The default run is bounded (profile "conformance", deterministic); ``make conformance`` runs the
"conformance-long" profile (HYPOTHESIS_PROFILE=long) with many more examples and steps.

Where cowfs differs from the kernel on purpose, the reference and the tolerated differences are
stated once, below, with the reason for each.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conformance_support import (
    ACL_ACCESS,
    ACL_DEFAULT,
    OLD_NS,
    Entry,
    HardLink,
    Pair,
    Sparse,
    Tolerated,
    acl,
    fresh_dir,
    remove_tree,
    view,
)
from hypothesis import HealthCheck, Phase, event, note, reject, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import RENAME_EXCHANGE, RENAME_NOREPLACE, Dir, File, Symlink, Whiteout

from cowfs.daemon.operations import can_inherit_acls

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

# =============================================================================================
# The reference, and where cowfs differs from it on purpose. This is the one place that says so.

#: The kernel's overlayfs as cowfs means to behave (issue 3 defines cowfs's target):
#: - redirect_dir=on: renaming a directory that has lower content succeeds (the kernel records a
#:   redirect); with the kernel's default (off) it fails with EXDEV, which cowfs means to do better
#:   than (fuse-overlayfs's EXDEV breaks os.rename, rustup, package managers).
#: - index=on: a hard-link set that exists in a lower layer stays one file after copy-up (writes
#:   through one name show through the others; nlink agrees), as cowfs promises.
#: - metacopy=off: cowfs copies data up whole, as the kernel then does (visible only in timing).
KERNEL_OPTIONS = ("redirect_dir=on", "index=on", "metacopy=off")


#: Outcomes where cowfs may differ from the reference on purpose; when one applies, the kernel
#: does not run the step (so both sides stay in the same state) and the run goes on. None today:
#: the one there was (renaming a directory with lower content: cowfs answered EXDEV, the kernel's
#: redirect_dir=off behaviour) ended when cowfs's redirects (issue 3) landed; dir renames are now
#: compared in full against redirect_dir=on. A new entry looks like:
#:   Tolerated("name", "reason", frozenset({"rename"}), lambda step, view_before, got: ...)
TOLERATED: dict[str, Tolerated] = {}


@dataclass(frozen=True, slots=True)
class KnownBug:
    """A cowfs bug that a regression test pins (strict xfail) until it is fixed. An example whose
    fixture can show it and whose failure looks like it is rejected, so that the run goes on
    looking for other bugs; delete the entry when the bug is fixed."""

    regression: str  # the test in test_conformance_regressions.py
    fixture: Callable[[list[dict[str, Any]]], bool]  # can these layers show the bug?
    failure: Callable[[str], bool]  # is this failure message the bug?


#: None pinned at the moment (the last ones are fixed and kept as regression tests).
KNOWN_BUGS: dict[str, KnownBug] = {}

# =============================================================================================
# Fixtures: random layers.

NAMES = ("a", "b", "c", "d")
NEW_NAMES = (*NAMES, "e")
FILE_MODES = (0o644, 0o600, 0o755, 0o444, 0o4755, 0o2755)
DIR_MODES = (0o755, 0o700, 0o1777, 0o2775, 0o555)
IDS = (0, 1000)
XATTR_NAMES = ("user.k1", "user.k2")
SYMLINK_TARGETS = ("a", "../a", "b/c", "/nonexistent", "d", ".")
SECOND = 10**9

_times = st.integers(0, 3).map(lambda t: (OLD_NS + t * SECOND, OLD_NS + t * SECOND))
_xattrs = st.dictionaries(st.sampled_from(XATTR_NAMES), st.binary(max_size=6), max_size=2)
_contents = st.one_of(
    st.none(),  # "<layer>:<path>": shows which layer served a read
    st.binary(max_size=40),
    st.sampled_from([b"x" * 5000, bytes(range(256)) * 20]),
)


@st.composite
def _file(draw: st.DrawFn) -> File:
    return File(
        draw(_contents),
        mode=draw(st.sampled_from(FILE_MODES)),
        uid=draw(st.sampled_from(IDS)),
        gid=draw(st.sampled_from(IDS)),
        xattrs=draw(_xattrs),
        times_ns=draw(_times),
    )


@st.composite
def _dir(draw: st.DrawFn, opaque: bool = False) -> Dir:
    xattrs = dict(draw(_xattrs))
    if opaque:
        xattrs["trusted.overlay.opaque"] = b"y"  # the kernel's own spelling, in a lower layer
    return Dir(
        mode=draw(st.sampled_from(DIR_MODES)),
        uid=draw(st.sampled_from(IDS)),
        gid=draw(st.sampled_from(IDS)),
        xattrs=xattrs,
        times_ns=draw(_times),
    )


@st.composite
def _sparse(draw: st.DrawFn) -> Sparse:
    size = draw(st.sampled_from([8192, 70000, 200_000]))
    offsets = draw(st.lists(st.integers(0, size - 8), max_size=2))
    return Sparse(size, tuple((o, b"data@%d" % o) for o in offsets), times_ns=draw(_times))


_LEAF_KINDS = ("file", "file", "symlink", "sparse", "whiteout")
_KINDS = (*_LEAF_KINDS, "dir", "dir", "opaque")


@st.composite
def layer_spec(draw: st.DrawFn) -> dict[str, Any]:
    """One lower layer: a small tree over NAMES, depth <= 3, plus hard links between its files."""
    spec: dict[str, Any] = {}
    dirs = [""]
    files: list[str] = []
    pending = [("", 0)]
    while pending:
        prefix, depth = pending.pop()
        for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=3 - depth)):
            rel = prefix + name
            kind = draw(st.sampled_from(_KINDS if depth < 2 else _LEAF_KINDS))
            if kind in ("dir", "opaque"):
                spec[rel] = draw(_dir(kind == "opaque"))
                dirs.append(rel + "/")
                pending.append((rel + "/", depth + 1))
            elif kind == "file":
                spec[rel] = draw(_file())
                files.append(rel)
            elif kind == "sparse":
                spec[rel] = draw(_sparse())
                files.append(rel)
            elif kind == "symlink":
                spec[rel] = Symlink(draw(st.sampled_from(SYMLINK_TARGETS)))
            else:
                spec[rel] = Whiteout()
    if files:
        for _ in range(draw(st.integers(0, 2))):
            rel = draw(st.sampled_from(dirs)) + draw(st.sampled_from(NEW_NAMES))
            if rel not in spec:
                spec[rel] = HardLink(draw(st.sampled_from(files)))
    return spec


def _merges_below(stack: list[dict[str, Any]], i: int, parent: str) -> bool:
    """Whether directory ``parent`` of layer ``i`` merges with the layer below (the root always
    does): then a whiteout in it hides something. The kernel lists whiteouts in a directory that
    merges with nothing (it reads such a directory straight from its layer, see ovl_dir_is_real),
    so a layer with one there is not one the kernel supports; the fixtures have none."""
    if i + 1 >= len(stack):
        return False
    parts = parent.split("/")
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        mine, below = stack[i].get(prefix), stack[i + 1].get(prefix)
        if not isinstance(mine, Dir) or "trusted.overlay.opaque" in mine.xattrs:
            return False
        if not isinstance(below, Dir):
            return False
    return True


@st.composite
def layer_stacks(draw: st.DrawFn) -> list[dict[str, Any]]:
    stack = draw(st.lists(layer_spec(), min_size=1, max_size=3))
    for i, spec in enumerate(stack):
        for rel in [r for r, o in spec.items() if isinstance(o, Whiteout)]:
            parent = rel.rpartition("/")[0]
            if parent and not _merges_below(stack, i, parent):
                del spec[rel]
    return stack


# =============================================================================================
# The state machine.

OFFSETS = (0, 1, 100, 4095, 4096, 5000, 70000)
SIZES = (0, 1, 10, 4096, 5000, 100_000)
MODES = (0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o1777, 0o2775)
UTIMES = tuple(OLD_NS + k * 7 * SECOND + k for k in range(4))
XATTR_FLAGS = (0, os.XATTR_CREATE, os.XATTR_REPLACE)
#: ACLs for the acl steps: a minimal one (the mode alone), a named user and group with a mask.
ACLS = (acl("u::rw-", "g::r--", "o::---"),
        acl("u::rwx", "U:1000:rw-", "G:1000:r-x", "g::r--", "m::rwx", "o::r--"))
#: fallocate modes the kernel's FUSE passes on: allocate, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE.
FALLOCATE_MODES = (0, 0x01, 0x01 | 0x02, 0x10)
USER = 1000
_payloads = st.one_of(st.binary(min_size=1, max_size=20), st.just(b"y" * 5000))


class Conformance(RuleBasedStateMachine):
    def __init__(self, base: Path, watchdog: float) -> None:
        super().__init__()
        self.base = base
        self.watchdog = watchdog
        self.dir: Path | None = None
        self.pair: Pair | None = None
        self.current: dict[str, Entry] = {}
        self.held: list[int] = []
        self.holds = 0
        self.lowers: list[dict[str, Any]] = []

    # --- the fixture --------------------------------------------------------------------------

    @initialize(lowers=layer_stacks())
    def mount(self, lowers: list[dict[str, Any]]) -> None:
        note(f"lowers = {lowers!r}")
        self.lowers = lowers
        self.dir = fresh_dir(self.base, "example-")
        self.pair = Pair(
            self.dir,
            lowers,
            kernel_options=KERNEL_OPTIONS,
            cowfs_options=("allow_other",),  # for the steps run as another user
            tolerated=list(TOLERATED.values()),
            watchdog=self.watchdog,
            public=True,
        )
        self.pair.start()
        self.current = view(self.pair.kernel)

    def teardown(self) -> None:
        if self.pair is None:
            return
        try:
            self.pair.stop()
        finally:
            for _, name in self.pair.seen:
                event(f"tolerated: {name}")
        self.pair.assert_lowers_unchanged()
        assert self.dir is not None
        remove_tree(self.dir)

    @invariant()
    def same_view(self) -> None:
        if self.pair is None:
            return
        with self._known_bugs():
            self.pair.check()
        self.current = view(self.pair.kernel)

    @contextlib.contextmanager
    def _known_bugs(self) -> Iterator[None]:
        try:
            yield
        except AssertionError as e:
            for name, bug in KNOWN_BUGS.items():
                if bug.fixture(self.lowers) and bug.failure(str(e)):
                    event(f"known bug: {name}")
                    reject()
            raise

    # --- choosing paths -----------------------------------------------------------------------

    def _paths(self, *kinds: str) -> list[str]:
        return sorted(
            r for r, e in self.current.items() if r != "." and (not kinds or e.kind in kinds)
        )

    def _existing(self, data: st.DataObject, *kinds: str) -> str:
        paths = self._paths(*kinds) or self._paths()
        if not paths:
            return self._new(data)
        return data.draw(st.sampled_from(paths))

    def _new(self, data: st.DataObject) -> str:
        parent = data.draw(st.sampled_from(["", *(p + "/" for p in self._paths("dir"))]))
        return parent + data.draw(st.sampled_from(NEW_NAMES))

    def _any(self, data: st.DataObject, *kinds: str) -> str:
        if data.draw(st.booleans()):
            return self._existing(data, *kinds)
        return self._new(data)

    def _step(self, *step: Any) -> None:
        note(f"    {step!r},")
        assert self.pair is not None
        with self._known_bugs():
            self.pair.run(step)

    # --- the operations -----------------------------------------------------------------------

    @rule(data=st.data(), how=st.sampled_from(["cx", "c"]), mode=st.sampled_from(MODES))
    def create(self, data: st.DataObject, how: str, mode: int) -> None:
        self._step("open", self._any(data, "file"), how, mode)

    @rule(data=st.data(), how=st.sampled_from(["w", "rw", "wt", "a"]))
    def open_without_writing(self, data: st.DataObject, how: str) -> None:
        self._step("open", self._existing(data, "file"), how)

    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), payload=_payloads)
    def write(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        self._step("pwrite", self._existing(data, "file"), offset, payload)

    @rule(data=st.data(), payload=_payloads)
    def append(self, data: st.DataObject, payload: bytes) -> None:
        self._step("append", self._existing(data, "file"), payload)

    @rule(data=st.data(), size=st.sampled_from(SIZES))
    def truncate(self, data: st.DataObject, size: int) -> None:
        self._step("truncate", self._existing(data, "file"), size)

    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        self._step("unlink", self._any(data, "file", "symlink", "fifo"))

    @rule(data=st.data(), mode=st.sampled_from(MODES))
    def mkdir(self, data: st.DataObject, mode: int) -> None:
        self._step("mkdir", self._any(data, "dir"), mode)

    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        self._step("rmdir", self._any(data, "dir"))

    @rule(data=st.data(), flags=st.sampled_from([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE]))
    def rename(self, data: st.DataObject, flags: int) -> None:
        src = self._existing(data)
        dst = self._any(data) if data.draw(st.booleans()) else self._existing(data, "dir")
        self._step("rename", src, dst, flags) if flags else self._step("rename", src, dst)

    @rule(data=st.data(), text=st.sampled_from(SYMLINK_TARGETS))
    def symlink(self, data: st.DataObject, text: str) -> None:
        self._step("symlink", text, self._any(data))

    @rule(data=st.data())
    def link(self, data: st.DataObject) -> None:
        self._step("link", self._existing(data, "file", "symlink"), self._any(data))

    @rule(data=st.data())
    def mkfifo(self, data: st.DataObject) -> None:
        self._step("mknod", self._new(data), 0o010644)

    @rule(data=st.data(), mode=st.sampled_from(MODES))
    def chmod(self, data: st.DataObject, mode: int) -> None:
        self._step("chmod", self._existing(data), mode)

    @rule(data=st.data(), uid=st.sampled_from((0, 1000, 2000)), gid=st.sampled_from((0, 1000)))
    def chown(self, data: st.DataObject, uid: int, gid: int) -> None:
        self._step("chown", self._existing(data), uid, gid)

    @rule(data=st.data(), atime=st.sampled_from(UTIMES), mtime=st.sampled_from(UTIMES))
    def utime(self, data: st.DataObject, atime: int, mtime: int) -> None:
        self._step("utime", self._existing(data), atime, mtime)

    @rule(
        data=st.data(),
        name=st.sampled_from([*XATTR_NAMES, "user.overlay.k3"]),
        value=st.binary(max_size=6),
        flags=st.sampled_from(XATTR_FLAGS),
    )
    def setxattr(self, data: st.DataObject, name: str, value: bytes, flags: int) -> None:
        self._step("setxattr", self._existing(data, "file", "dir"), name, value, flags)

    @rule(data=st.data(), name=st.sampled_from([*XATTR_NAMES, "user.overlay.k3"]))
    def removexattr(self, data: st.DataObject, name: str) -> None:
        self._step("removexattr", self._existing(data, "file", "dir"), name)

    @rule(data=st.data())
    def seekdir(self, data: st.DataObject) -> None:
        self._step("seekdir", data.draw(st.sampled_from([".", *self._paths("dir")])))

    @rule(data=st.data(), mode=st.sampled_from(FALLOCATE_MODES), offset=st.sampled_from(OFFSETS))
    def fallocate(self, data: st.DataObject, mode: int, offset: int) -> None:
        self._step("fallocate", self._existing(data, "file"), mode, offset, 4096)

    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), payload=_payloads,
          fallocate=st.booleans())
    def change_as_user(self, data: st.DataObject, offset: int, payload: bytes,
                       fallocate: bool) -> None:
        """A write or fallocate by a user without CAP_FSETID: set-ID bits may go (a file the
        user may write: chown to 1000 and chmod 4755/2755 on the way make one)."""
        path = self._existing(data, "file")
        step = (("fallocate", path, 0, offset, 4096) if fallocate
                else ("pwrite", path, offset, payload))
        self._step("as", USER, USER, step)

    @rule(data=st.data(), value=st.sampled_from(ACLS), default=st.booleans())
    def set_acl(self, data: st.DataObject, value: bytes, default: bool) -> None:
        """An access ACL on anything (the mode follows), or a default ACL on a directory, which
        objects made in it inherit (only where cowfs can: patches/pyfuse3/0004)."""
        if default and can_inherit_acls():
            self._step("setxattr", self._existing(data, "dir"), ACL_DEFAULT, value)
        else:
            self._step("setxattr", self._existing(data, "file", "dir"), ACL_ACCESS, value)

    @rule()
    def remount(self) -> None:
        self.held.clear()  # remount closes them
        self._step("remount")

    # --- descriptors held open across steps ---------------------------------------------------

    @rule(data=st.data(), how=st.sampled_from(["r", "rw"]))
    def hold(self, data: st.DataObject, how: str) -> None:
        number = self.holds
        self.holds += 1
        self._step("hold", self._existing(data, "file"), how)
        assert self.pair is not None
        if number in self.pair.cowfs_side.fds:
            self.held.append(number)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def read_held(self, data: st.DataObject) -> None:
        self._step("fd_read", data.draw(st.sampled_from(self.held)))

    @precondition(lambda self: self.held)
    @rule(data=st.data(), offset=st.sampled_from(OFFSETS), payload=_payloads)
    def write_held(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        self._step("fd_write", data.draw(st.sampled_from(self.held)), offset, payload)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), size=st.sampled_from(SIZES))
    def truncate_held(self, data: st.DataObject, size: int) -> None:
        self._step("fd_truncate", data.draw(st.sampled_from(self.held)), size)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def stat_held(self, data: st.DataObject) -> None:
        self._step("fd_stat", data.draw(st.sampled_from(self.held)))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def close_held(self, data: st.DataObject) -> None:
        number = data.draw(st.sampled_from(self.held))
        self.held.remove(number)
        self._step("close", number)


# =============================================================================================
# Profiles: bounded and deterministic by default; HYPOTHESIS_PROFILE=long for `make conformance`.
# The default's 12 examples of up to 30 steps take about a minute on two shared cores (30 took
# nearly three, a ninth of `make test`); `make conformance` runs thousands.

settings.register_profile(
    "conformance",
    max_examples=12,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
settings.register_profile(
    "conformance-long",
    max_examples=2000,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
    ],
)
# "explore": random like "long" but stops at the first failure without shrinking it (to look
# for several bugs quickly; shrink the one chosen with the long profile).
settings.register_profile(
    "conformance-explore",
    settings.get_profile("conformance-long"),
    phases=[Phase.explicit, Phase.generate],
    database=None,
)
_CHOSEN = os.environ.get("HYPOTHESIS_PROFILE", "")
LONG = _CHOSEN in ("long", "explore")
PROFILE = settings.get_profile(f"conformance-{_CHOSEN}" if LONG else "conformance")


@pytest.mark.timeout(6 * 3600 if LONG else 900)
def test_random_sequences_match_the_kernel(tmp_path: Path) -> None:
    run_state_machine_as_test(lambda: Conformance(tmp_path, watchdog=120.0), settings=PROFILE)
