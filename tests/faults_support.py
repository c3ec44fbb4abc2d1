"""The machinery of tests/test_faults.py: layers, views, the count run and one fault case.

tests/test_faults.py's docstring describes the protocol; this module implements it so that a
failing case can be replayed by hand from a scratch script::

    from faults_support import SITUATIONS, Runner
    runner = Runner(Path("/tmp/x"), find_cowfs())
    reference = runner.count(SITUATIONS["rename/file/lower/new"])
    print(runner.case(SITUATIONS["rename/file/lower/new"], reference, 2, "kill-before"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import os
import shutil
import stat
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from support import (
    OPAQUE_USER,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    CowfsMount,
    Dir,
    Entry,
    File,
    Spec,
    Whiteout,
    build_layer,
    describe,
    diff_trees,
    renameat2,
    run_steps_as,
    tree_state,
    walk,
)

from cowfs import cli
from cowfs.core import realfs

KILL_BEFORE = "kill-before"
KILL_AFTER = "kill-after"
KILLS = (KILL_BEFORE, KILL_AFTER)
ERRNOS = ("ENOSPC", "EIO", "EACCES", "EDQUOT")
ACTIONS = (*KILLS, *ERRNOS)

#: Every non-directory in the layers gets this mtime (2001-09-09), so that views of two copies of
#: the same layers are equal; an mtime after RECENT_NS was set by the operation ("now") and is
#: compared as RECENT, since a re-run sets another "now".
FIXED_MTIME_NS = 1_000_000_000 * 10**9
#: What the utime operation sets (2017-07-14): an exact, old time, compared exactly.
UTIME_NS = 1_500_000_000 * 10**9
RECENT_NS = 1_600_000_000 * 10**9
RECENT = -1

USER = 1000  # the plain caller of the ownership cases
MOUNT_WATCHDOG = 90.0

# ---------------------------------------------------------------------------------------------
# The layers: one lower and one upper holding every situation side by side. Names: l* lower only,
# u* upper only, m* merged (in both), w* whited out in the upper, h* a lower hard-link set.

LOWER: Spec = {
    "lf": None,  # a lower-only file
    "lf2": None,
    "mf": None,  # a merged file: the upper has its own copy
    "lsym@": "lf",
    "ld/x": None,  # a lower-only directory with content
    "ld/sub/y": None,
    "led/": None,  # a lower-only empty directory
    "md/x": None,  # a merged directory
    "mdd/x": None,  # a merged directory whose lower content is all deleted (whited out above)
    "owd/x": None,  # below an opaque upper directory
    "hl": None,  # hard-linked to hl2 (made after building)
    "wf": None,  # whited out in the upper
    "wd/x": None,  # whited out in the upper
    "pub/": Dir(mode=0o777),  # world-writable, for the plain user's creates
    "pub/lf": File(mode=0o666),
    "sub/y": None,  # a destination directory
    "lx": File(xattrs={"user.a": b"1"}),  # a lower file with an xattr
    "mc": File(b"metacopy data\n" * 300),  # the upper holds a metacopy copy (see build)
    "pl": File(bytes(range(256)) * 1000),  # large enough to copy up partly (PARTIAL_MIN)
    "pc": File(bytes(range(255, -1, -1)) * 1000),  # the upper holds a partial copy (see build)
}
UPPER: Spec = {
    "uf": None,  # an upper-only file
    "uf2": None,
    "mf": None,
    "ud/x": None,  # an upper-only directory with content
    "ued/": None,  # an upper-only empty directory
    "md/u": None,
    "mdd/x": Whiteout(),
    "owd/": Dir(xattrs=OPAQUE_USER),  # an opaque (empty) directory over a lower one
    "wf": Whiteout(),
    "wd": Whiteout(),
    "upub/": Dir(mode=0o777),
}


@dataclass(frozen=True, slots=True)
class Layers:
    root: Path
    lowers: list[Path]
    upper: Path
    mnt: Path

    @property
    def tmp(self) -> Path:
        return self.upper / ".cowfs-work" / "tmp"


def build(root: Path, mnt: Path) -> Layers:
    """A fresh copy of LOWER and UPPER under ``root``, every non-directory at FIXED_MTIME_NS."""
    lower = build_layer(root / "lower0", LOWER, "lower0")
    os.link(lower / "hl", lower / "hl2")
    upper = build_layer(root / "upper", UPPER, "upper")
    _metacopy(lower, upper, "mc")
    _partial(lower, upper, "pc")
    for layer in (lower, upper):
        for _, path, st in walk(layer):
            if not stat.S_ISDIR(st.st_mode):
                os.utime(path, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS), follow_symlinks=False)
    return Layers(root, [lower], upper, mnt)


def _metacopy(lower: Path, upper: Path, name: str) -> None:
    """A metacopy upper copy of the lower file ``name``, as a chmod through the mount makes it
    (layer-format.md): sparse, of the lower's size, marked, with its origin; another mode."""
    st = os.stat(lower / name)
    path = upper / name
    with open(path, "wb") as f:
        f.truncate(st.st_size)
    os.setxattr(path, "user.overlay.metacopy", b"")
    os.setxattr(path, "user.cowfs.origin", f"1:{st.st_ino}:/{name}".encode())
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, 0o600)


#: Files of at least this size copy up partly (``-o partial_copyup``): ``pl`` and ``pc``.
PARTIAL_MIN = 128 << 10
PARTIAL_BLOCK = 64 << 10
#: The kernel splits a write(2) into requests at page boundaries (see Situation.lands_in_part).
PAGE = os.sysconf("SC_PAGE_SIZE")


def _partial(lower: Path, upper: Path, name: str) -> None:
    """A partial upper copy of the lower file ``name`` (layer-format.md 11b): a metacopy copy
    whose blocks 0 and 1 are in the upper (rewritten), with its data map."""
    _metacopy(lower, upper, name)
    path = upper / name
    mode = os.stat(path).st_mode
    os.chmod(path, 0o600)
    with open(path, "r+b") as f:
        f.write(b"P" * 2 * PARTIAL_BLOCK)
    os.chmod(path, mode)
    size = os.stat(lower / name).st_size
    os.setxattr(path, "user.cowfs.datamap", f"1 {PARTIAL_BLOCK} {size} {size} 0-2".encode())


# ---------------------------------------------------------------------------------------------
# The view.

View = dict[str, Entry]


def view(mnt: Path) -> View:
    """The merged view: every path with type, mode, owner, size, content hash, symlink target,
    nlink and mtime of non-directories (RECENT when set by the operation), user xattrs."""
    result = {}
    for rel, path, st in walk(mnt):
        entry = describe(path, st, times=True, xattr_prefix="user.")
        mtime = entry.mtime_ns
        if entry.kind == "dir":
            mtime = None
        elif mtime is not None and mtime >= RECENT_NS:
            mtime = RECENT
        result[rel] = dataclasses.replace(entry, mtime_ns=mtime, ctime_ns=None)
    return result


# ---------------------------------------------------------------------------------------------
# The operations. Each runs below the mount root and raises OSError on failure.

Op = Callable[[Path], object]


def _create(rel: str, mode: int = 0o640) -> Op:
    def op(root: Path) -> None:
        os.close(os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))

    return op


def _call(fn: Callable[..., object], *rels: str, **kwargs: object) -> Op:
    def op(root: Path) -> None:
        fn(*(root / r for r in rels), **kwargs)

    return op


def _rename(src: str, dst: str, flags: int = 0) -> Op:
    return lambda root: renameat2(root / src, root / dst, flags)


def _pwrite(rel: str) -> Op:
    def op(root: Path) -> None:
        fd = os.open(root / rel, os.O_WRONLY)
        try:
            os.pwrite(fd, b"W", 0)
        finally:
            os.close(fd)

    return op


def _pwrite_at(rel: str, offset: int, size: int, *, fsync: bool = False) -> Op:
    def op(root: Path) -> None:
        fd = os.open(root / rel, os.O_WRONLY)
        try:
            os.pwrite(fd, b"w" * size, offset)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    return op


def _punch(rel: str, offset: int, length: int) -> Op:
    def op(root: Path) -> None:
        fd = os.open(root / rel, os.O_WRONLY)
        try:
            realfs.fallocate(fd, 0x03, offset, length)  # KEEP_SIZE | PUNCH_HOLE
        finally:
            os.close(fd)

    return op


def _append(rel: str) -> Op:
    def op(root: Path) -> None:
        fd = os.open(root / rel, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"+appended")
        finally:
            os.close(fd)

    return op


@dataclass(frozen=True, slots=True)
class Situation:
    """One operation in one layer situation."""

    id: str  # "<op>/<what>/<where>/<to>"
    op: Op
    as_user: bool = False  # run as uid:gid USER (mount with allow_other)
    smoke: bool = False  # in the default selection with every action (see test_faults.py)
    #: A partial file (layer-format.md 11b) whose mtime a crash or a failure may leave changed
    #: with nothing else: a write whose blocks were never recorded (by the write, before it returns)
    #: is lost, not its mtime; a completion copies data in place before it sets the times back.
    #: A metacopy file (11a) likewise: it is given its data in place, as in the kernel.
    mtime_may_change: str | None = None
    #: A write(2) into a partial file, as (path, offset, size) of ``b"w" * size``, that the
    #: kernel may send as several requests, split at page boundaries: each request records the
    #: blocks it brings up (cowfs answers no FLUSH), so a crash between two of them leaves the
    #: write landed in part, a prefix up to a page boundary, as a write(2) in flight may land on
    #: any filesystem (README, "What cowfs guarantees").
    lands_in_part: tuple[str, int, int] | None = None

    @property
    def family(self) -> str:
        return self.id.split("/", 1)[0]


def _situations() -> list[Situation]:
    s = Situation
    link = lambda a, b: _call(os.link, a, b, follow_symlinks=False)  # noqa: E731
    return [
        # creating
        s("create/file/root/new", _create("new")),
        s("create/file/over-whiteout/wf", _create("wf")),
        s("create/file/lower-dir/ld-new", _create("ld/new")),
        s("create/file/as-user/pub-new", _create("pub/new"), as_user=True, smoke=True),
        s("create/file/as-user/upub-new", _create("upub/new"), as_user=True),
        s("mknod/fifo/root/new", _call(os.mkfifo, "new", mode=0o640)),
        s("mknod/fifo/over-whiteout/wf", _call(os.mkfifo, "wf", mode=0o640)),
        s("mkdir/dir/root/new", _call(os.mkdir, "new", mode=0o750)),
        s("mkdir/dir/over-whiteout/wd", _call(os.mkdir, "wd", mode=0o750), smoke=True),
        s("mkdir/dir/lower-dir/ld-new", _call(os.mkdir, "ld/new", mode=0o750)),
        s("mkdir/dir/as-user/pub-new", _call(os.mkdir, "pub/new", mode=0o750), as_user=True),
        s("symlink/symlink/root/new", lambda r: os.symlink("lf", r / "new")),
        s("symlink/symlink/over-whiteout/wf", lambda r: os.symlink("lf", r / "wf")),
        s("link/file/upper/new", link("uf", "new")),
        s("link/file/lower/new", link("lf", "new")),
        s("link/file/lower/over-whiteout", link("lf", "wf")),
        # removing
        s("unlink/file/lower", _call(os.unlink, "lf"), smoke=True),
        s("unlink/file/upper", _call(os.unlink, "uf")),
        s("unlink/file/merged", _call(os.unlink, "mf")),
        s("unlink/symlink/lower", _call(os.unlink, "lsym")),
        s("unlink/file/lower-in-lower-dir", _call(os.unlink, "ld/x")),
        s("rmdir/dir/lower-empty", _call(os.rmdir, "led")),
        s("rmdir/dir/upper-empty", _call(os.rmdir, "ued")),
        s("rmdir/dir/merged-all-deleted", _call(os.rmdir, "mdd"), smoke=True),
        s("rmdir/dir/opaque-over-lower", _call(os.rmdir, "owd")),
        # renaming files
        s("rename/file/lower/new", _rename("lf", "new"), smoke=True),
        s("rename/file/upper/new", _rename("uf", "new")),
        s("rename/file/merged/new", _rename("mf", "new"), smoke=True),
        s("rename/file/lower/onto-upper", _rename("lf", "uf")),
        s("rename/file/lower/onto-lower", _rename("lf", "lf2")),
        s("rename/file/upper/onto-lower", _rename("uf", "lf")),
        s("rename/file/upper/onto-upper", _rename("uf", "uf2")),
        s("rename/file/merged/onto-lower", _rename("mf", "lf")),
        s("rename/file/lower/onto-merged", _rename("lf", "mf")),
        s("rename/file/lower/onto-whiteout", _rename("lf", "wf")),
        s("rename/file/lower/across-dirs", _rename("lf", "sub/new")),
        s("rename/file/upper/across-dirs", _rename("uf", "ld/new")),
        s("rename/symlink/lower/new", _rename("lsym", "new")),
        s("rename/file/lower/noreplace-new", _rename("lf", "new", RENAME_NOREPLACE)),
        s("rename/file/lower-upper/exchange", _rename("lf", "uf", RENAME_EXCHANGE)),
        s("rename/file/lower-merged/exchange", _rename("lf", "mf", RENAME_EXCHANGE)),
        s("rename/file-dir/lower-lower/exchange", _rename("lf", "ld", RENAME_EXCHANGE)),
        # renaming directories
        s("rename/dir/lower/new", _rename("ld", "new"), smoke=True),
        s("rename/dir/upper/new", _rename("ud", "new")),
        s("rename/dir/merged/new", _rename("md", "new")),
        s("rename/dir/lower/onto-lower-empty", _rename("ld", "led")),
        s("rename/dir/upper/onto-upper-empty", _rename("ud", "ued")),
        s("rename/dir/lower/onto-merged-all-deleted", _rename("ld", "mdd")),
        s("rename/dir/upper/onto-merged-all-deleted", _rename("ud", "mdd")),
        s("rename/dir/upper/onto-whiteout", _rename("ud", "wd")),
        s("rename/dir/lower/across-dirs", _rename("ld", "sub/new")),
        s("rename/dir/merged/across-dirs", _rename("md", "sub/new")),
        s("rename/dir/lower/noreplace-new", _rename("ld", "new", RENAME_NOREPLACE)),
        s("rename/dir/lower-upper/exchange", _rename("ld", "ud", RENAME_EXCHANGE)),
        s("rename/dir/lower-merged/exchange", _rename("ld", "md", RENAME_EXCHANGE)),
        # copy-up of data
        s("copyup-data/file/lower/write-1-byte", _pwrite("lf"), smoke=True),
        s("copyup-data/file/lower/append", _append("lf")),
        s("copyup-data/file/lower-dir/write-1-byte", _pwrite("ld/sub/y")),
        # copy-up of metadata only
        s("copyup-meta/file/lower/chmod", _call(os.chmod, "lf", mode=0o600), smoke=True),
        s("copyup-meta/file/lower/rename", _rename("lf", "sub/new")),
        s("copyup-meta/file/lower/link", link("lf", "sub/new")),
        s("copyup-meta/file/lower/removexattr", lambda r: os.removexattr(r / "lx", "user.a")),
        s("copyup-meta/file/lower/chown", lambda r: os.chown(r / "lf", USER, USER)),
        s("copyup-meta/file/lower/utime", _call(os.utime, "lf", ns=(UTIME_NS, UTIME_NS))),
        s("copyup-meta/file/lower/truncate", lambda r: os.truncate(r / "lf", 3)),
        s("copyup-meta/file/lower/setxattr", lambda r: os.setxattr(r / "lf", "user.x", b"1")),
        s("copyup-meta/dir/lower/chmod", _call(os.chmod, "ld", mode=0o700)),
        s("copyup-meta/symlink/lower/chown",
          lambda r: os.chown(r / "lsym", USER, USER, follow_symlinks=False)),
        # a metacopy upper file (data in the lower): filled at the first write or truncation
        # (filled in place, as the kernel does: a crash before the mark's removal leaves the data
        # coming from the lower, but may leave the mtime of the crash, layer-format.md 11a)
        s("metacopy/file/upper/write-1-byte", _pwrite("mc"), smoke=True, mtime_may_change="mc"),
        s("metacopy/file/upper/append", _append("mc"), mtime_may_change="mc"),
        s("metacopy/file/upper/truncate", lambda r: os.truncate(r / "mc", 3), smoke=True,
          mtime_may_change="mc"),
        s("metacopy/file/upper/open-trunc",
          lambda r: os.close(os.open(r / "mc", os.O_WRONLY | os.O_TRUNC)), mtime_may_change="mc"),
        s("metacopy/file/upper/chmod", _call(os.chmod, "mc", mode=0o640)),
        s("metacopy/file/upper/chown-foreign", lambda r: os.chown(r / "mc", USER, USER),
          mtime_may_change="mc"),
        s("metacopy/file/upper/rename", _rename("mc", "sub/new")),
        s("metacopy/file/upper/unlink", _call(os.unlink, "mc")),
        # copy-up of only the written blocks (pl: a large lower file; pc: a partial upper copy)
        s("partial/file/lower/write-4k", _pwrite_at("pl", 100_000, 4096), smoke=True,
          mtime_may_change="pl", lands_in_part=("pl", 100_000, 4096)),
        s("partial/file/lower/truncate", lambda r: os.truncate(r / "pl", 70_000)),
        s("partial/file/upper/write-new-block", _pwrite_at("pc", 3 * PARTIAL_BLOCK + 5, 10),
          smoke=True, mtime_may_change="pc"),
        s("partial/file/upper/write-fsync", _pwrite_at("pc", 3 * PARTIAL_BLOCK + 9, 10, fsync=True),
          mtime_may_change="pc"),
        # every block not up yet (2 and 3): the map becomes complete, then the file
        s("partial/file/upper/write-rest", _pwrite_at("pc", 2 * PARTIAL_BLOCK,
                                                      256_000 - 2 * PARTIAL_BLOCK),
          mtime_may_change="pc", lands_in_part=("pc", 2 * PARTIAL_BLOCK,
                                                256_000 - 2 * PARTIAL_BLOCK)),
        s("partial/file/upper/truncate", lambda r: os.truncate(r / "pc", 70_000), smoke=True),
        s("partial/file/upper/truncate-up", lambda r: os.truncate(r / "pc", 300_000)),
        s("partial/file/upper/open-trunc",
          lambda r: os.close(os.open(r / "pc", os.O_WRONLY | os.O_TRUNC))),
        s("partial/file/upper/chown-foreign", lambda r: os.chown(r / "pc", USER, USER),
          smoke=True, mtime_may_change="pc"),
        s("partial/file/upper/punch", _punch("pc", 10, 100), mtime_may_change="pc"),
        # the hard-link index (lower hl and hl2 are one file)
        s("hardlink/file/lower/write-1-byte", _pwrite("hl"), smoke=True),
        s("hardlink/file/lower/unlink", _call(os.unlink, "hl")),
        s("hardlink/file/lower/rename", _rename("hl", "new")),
        s("hardlink/file/lower/link", link("hl", "new")),
    ]


SITUATIONS: dict[str, Situation] = {s.id: s for s in _situations()}


# ---------------------------------------------------------------------------------------------
# Running: the count run (reference views) and one fault case.


def outcome_of(situation: Situation, mnt: Path) -> str:
    """'ok' or the errno name of the failure; a plain user's op runs in a forked child."""
    if situation.as_user:

        def step(root: Path) -> str:
            situation.op(root)
            return "ok"

        return str(run_steps_as(USER, USER, mnt, [step])[0])
    try:
        situation.op(mnt)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, f"errno {e.errno}")
    return "ok"


@dataclass(frozen=True, slots=True)
class Reference:
    """What the count run learned about a situation."""

    changes: list[str]  # the count file's lines: change n is changes[n - 1]
    before: View
    after: View
    #: The content before the operation of the file a write may land in part in.
    written_before: bytes | None = None

    @property
    def k(self) -> int:
        return len(self.changes)


@dataclass(frozen=True, slots=True)
class CaseResult:
    situation: str
    n: int
    action: str
    kind: str  # "before", "after" (kills); "failed", "succeeded" (errnos); "error" otherwise
    problems: tuple[str, ...]
    change: str  # the count file's line for change n

    @property
    def passed(self) -> bool:
        return not self.problems

    def message(self) -> str:
        head = (f"{self.situation}: change {self.n} ({self.change}) with {self.action}: "
                f"ended {self.kind}")
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class Runner:
    """Builds layers under ``base`` (one directory per run) and mounts them with ``command``."""

    def __init__(self, base: Path, command: Path) -> None:
        self.base = base
        self.command = command
        self._runs = 0
        # Mount points where a plain user can reach them (pytest's tmp dirs are private).
        self._public = Path(tempfile.mkdtemp(prefix="cowfs-faults-"))
        self._public.chmod(0o755)

    def close(self) -> None:
        # rmdir, never rmtree: should a mount have survived, rmtree would delete through it.
        for mnt in self._public.iterdir():
            with contextlib.suppress(OSError):
                mnt.rmdir()
        with contextlib.suppress(OSError):
            self._public.rmdir()

    def _fresh(self, situation: Situation) -> Layers:
        self._runs += 1
        root = self.base / f"run{self._runs}"
        mnt = self._public / f"mnt{self._runs}"
        mnt.mkdir()
        return build(root, mnt)

    def _mount(self, layers: Layers, situation: Situation,
               env: Mapping[str, str] | None = None) -> CowfsMount:
        mount = CowfsMount(layers.lowers, layers.upper, layers.mnt, command=self.command,
                           log_dir=layers.root, watchdog=MOUNT_WATCHDOG, env=env,
                           options=("metacopy", f"partial_copyup={PARTIAL_MIN}",
                                    *(("allow_other",) if situation.as_user else ())))
        mount.start()
        return mount

    @contextlib.contextmanager
    def _mounted(self, layers: Layers, situation: Situation) -> Iterator[CowfsMount]:
        mount = self._mount(layers, situation)
        try:
            yield mount
        finally:
            mount.stop()

    def _final_checks(self, layers: Layers, lowers_before: list[View]) -> list[str]:
        """After the last unmount: lowers unchanged, check clean, the work dir's tmp/ empty."""
        problems = []
        for path, state in zip(layers.lowers, lowers_before, strict=True):
            diff = diff_trees(state, tree_state(path), ("before", "after"))
            if diff:
                problems.append(f"lower layer {path} changed:\n{diff}")
        status, output = cowfs_check(layers)
        if status != 0 or "no problems found" not in output:
            problems.append(f"cowfs check exited {status}: {output.strip()}")
        if layers.tmp.is_dir() and (left := sorted(os.listdir(layers.tmp))):
            problems.append(f"work dir tmp/ not empty after a clean remount: {left}")
        return problems

    def count(self, situation: Situation) -> Reference:
        """Run the operation once with ``count:FILE``: the changes it makes, the view before it
        and the view after it (read after a remount). Fails if anything there goes wrong."""
        layers = self._fresh(situation)
        lowers_before = [tree_state(p) for p in layers.lowers]
        count_file = layers.root / "count"
        mount = self._mount(layers, situation, {"COWFS_FAULT": f"count:{count_file}"})
        try:
            before = view(layers.mnt)
            written_before = (None if situation.lands_in_part is None
                              else (layers.mnt / situation.lands_in_part[0]).read_bytes())
            assert not _lines(count_file), f"reading the view changed the upper: {count_file}"
            outcome = outcome_of(situation, layers.mnt)
            assert outcome == "ok", f"{situation.id} failed without a fault: {outcome}"
        finally:
            try:
                mount.stop()
            finally:
                if mount.mounted:
                    mount.detach_dead()
        changes = _lines(count_file)
        with self._mounted(layers, situation) as mount:
            after = view(layers.mnt)
        problems = self._final_checks(layers, lowers_before)
        assert not problems, f"{situation.id} without a fault:\n" + "\n".join(problems)
        assert after != before, f"{situation.id} changed nothing in the view"
        return Reference(changes, before, after, written_before)

    def case(self, situation: Situation, ref: Reference, n: int, action: str) -> CaseResult:
        """Fresh layers; mount with COWFS_FAULT=<n>:<action>; run the operation; judge."""
        layers = self._fresh(situation)
        lowers_before = [tree_state(p) for p in layers.lowers]
        env = {"COWFS_FAULT": f"{n}:{action},count:{layers.root / 'count'}"}
        mount = self._mount(layers, situation, env)
        try:
            return self._judge(situation, ref, n, action, layers, mount, lowers_before)
        finally:
            if mount.mounted:  # interrupted (Ctrl-C, timeout): never leave a mount behind
                mount.detach_dead()

    def _judge(self, situation: Situation, ref: Reference, n: int, action: str, layers: Layers,
               mount: CowfsMount, lowers_before: list[View]) -> CaseResult:
        count_file = layers.root / "count"
        problems: list[str] = []
        kind = "error"
        try:
            outcome = outcome_of(situation, layers.mnt)
            if action in KILLS:
                status = mount.detach_dead()
                if status != -9:
                    problems.append(f"the daemon was not killed (exit status {status}); "
                                    f"the operation returned {outcome}")
            else:
                kind, expected = _errno_kind(outcome, action, ref, problems)
                if expected is not None:
                    live = view(layers.mnt)
                    if kind == "failed" and situation.mtime_may_change is not None:
                        expected = _with_mtime(expected, situation.mtime_may_change, live)
                    _compare(expected, live, f"live view after {outcome}", problems)
                mount.stop()
        except AssertionError as e:  # from CowfsMount.stop: unclean exit, traceback, hang
            problems.append(f"unmount: {e}")
            with contextlib.suppress(Exception):
                mount.detach_dead()
        seen = _lines(count_file)
        if len(seen) < n:
            problems.append(f"change {n} never happened (only {len(seen)}): the run diverged")
        elif seen[n - 1].split(" ", 2)[1:2] != ref.changes[n - 1].split(" ", 2)[1:2]:
            problems.append(f"change {n} was {seen[n - 1]!r}, the count run's was "
                            f"{ref.changes[n - 1]!r}")
        try:
            with self._mounted(layers, situation) as remount:
                final = view(remount.mnt)
        except AssertionError as e:
            problems.append(f"remount without a fault failed: {e}")
            return CaseResult(situation.id, n, action, "error", tuple(problems),
                              ref.changes[n - 1])
        if action in KILLS:
            if final == ref.before:
                kind = "before"
            elif final == ref.after:
                kind = "after"
            elif situation.mtime_may_change is not None and final == _with_mtime(
                    ref.before, situation.mtime_may_change, final):
                kind = "before (mtime changed)"
            elif _landed_in_part(situation, ref, final):
                kind = "write landed in part"
            else:
                kind = "mixture"
                problems.append("view after remount is neither the before nor the after view:\n"
                                + _two_diffs(ref, final))
        elif kind == "failed":
            expected = ref.before
            if situation.mtime_may_change is not None:
                expected = _with_mtime(expected, situation.mtime_may_change, final)
            _compare(expected, final, "view after remount", problems)
        elif kind == "succeeded":
            _compare(ref.after, final, "view after remount", problems)
        problems += self._final_checks(layers, lowers_before)
        shutil.rmtree(layers.root, ignore_errors=True)  # unmounted: only the layers are there
        with contextlib.suppress(OSError):
            layers.mnt.rmdir()
        return CaseResult(situation.id, n, action, kind, tuple(problems), ref.changes[n - 1])


def _landed_in_part(situation: Situation, ref: Reference, final: View) -> bool:
    """Whether ``final`` is the before view with a prefix of the situation's write landed, up
    to a page boundary inside it (and the file's mtime as ``final`` has it)."""
    if situation.lands_in_part is None or ref.written_before is None:
        return False
    path, offset, size = situation.lands_in_part
    old = ref.written_before
    first = (offset // PAGE + 1) * PAGE
    for boundary in range(first, offset + size, PAGE):
        landed = boundary - offset
        content = old[:offset] + b"w" * landed + old[offset + landed:]
        expected = dataclasses.replace(ref.before[path], sha256=hashlib.sha256(content).hexdigest(),
                                       mtime_ns=final[path].mtime_ns if path in final else None)
        if final == {**ref.before, path: expected}:
            return True
    return False


def _with_mtime(before: View, path: str, final: View) -> View:
    """``before`` with the mtime ``final`` has at ``path``: a write that a crash lost (its data
    was never recorded) still changed the file's mtime, as on any filesystem."""
    if path not in before or path not in final:
        return before
    return {**before, path: dataclasses.replace(before[path], mtime_ns=final[path].mtime_ns)}


def cowfs_check(layers: Layers) -> tuple[int, str]:
    """``cowfs check UPPER --lower LOWER`` (offline): exit status and output. Run in this process,
    by the command's own entry point: a new interpreter per case would double the cost."""
    out = io.StringIO()
    argv = ["check", str(layers.upper), "--lower", ":".join(map(str, layers.lowers))]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            status = cli.main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 1
    return status, out.getvalue()


def _errno_kind(outcome: str, action: str, ref: Reference,
                problems: list[str]) -> tuple[str, View | None]:
    if outcome == action:
        return "failed", ref.before
    if outcome == "ok":
        return "succeeded", ref.after
    problems.append(f"the operation returned {outcome}, expected {action} (or success)")
    return "wrong-errno", None


def _compare(expected: View, actual: View, what: str, problems: list[str]) -> None:
    diff = diff_trees(expected, actual, ("expected", "actual"))
    if diff:
        problems.append(f"{what} differs from the expected view:\n{diff}")


def _two_diffs(ref: Reference, final: View) -> str:
    return ("  vs before:\n" + diff_trees(ref.before, final, ("before", "remount"))
            + "\n  vs after:\n" + diff_trees(ref.after, final, ("after", "remount")))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------------
# Counts for the closing summary.


@dataclass(slots=True)
class Tally:
    situations: set[str] = dataclasses.field(default_factory=set)
    points: dict[str, int] = dataclasses.field(default_factory=dict)  # situation -> K
    kinds: Counter[tuple[str, str, bool]] = dataclasses.field(default_factory=Counter)

    def add(self, result: CaseResult) -> None:
        self.kinds[(result.action, result.kind, result.passed)] += 1

    def lines(self) -> list[str]:
        ops = {s.split("/", 1)[0] for s in self.points}
        total = sum(self.kinds.values())
        failed = sum(v for (_, _, ok), v in self.kinds.items() if not ok)
        out = [f"fault injection: {len(ops)} operations, {len(self.points)} situations, "
               f"{sum(self.points.values())} injection points; {total} cases run, "
               f"{total - failed} passed, {failed} failed"]
        for action in ACTIONS:
            row = {(k, ok): v for (a, k, ok), v in self.kinds.items() if a == action}
            if row:
                parts = ", ".join(f"{k} {'ok' if ok else 'FAILED'}: {v}"
                                  for (k, ok), v in sorted(row.items()))
                out.append(f"  {action:11} {parts}")
        return out
