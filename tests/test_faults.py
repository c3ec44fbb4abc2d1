"""Crash- and failure-atomicity of every change to the upper, proved by fault injection (issue 9).

The seam (cowfs/core/realfs.py): every wrapper that changes a layer carries ``@realfs.change``. A
daemon started with ``COWFS_FAULT`` in its environment counts those calls once the mount is ready
(what
mounting itself does, e.g. recovery, is not counted) and, by comma-separated directives:

* ``N:kill-before`` / ``N:kill-after``: SIGKILLs itself just before / just after the N-th
  change's syscall (1-based);
* ``N:ENOSPC`` (or ``EIO``, ``EACCES``, ``EDQUOT``, any errno name): the N-th change raises that
  OSError instead of making its syscall;
* ``count:FILE``: appends ``<n> <wrapper> <args>`` to FILE for every change.

The protocol, for each situation (an operation in one layer situation, tests/faults_support.py's
SITUATIONS, all on one small pair of layers, LOWER and UPPER, built fresh for every run):

1. The count run: mount with ``count:FILE``, read the **before** view, run the operation (it must
   succeed), unmount: its K changes are FILE's lines. Remount without faults and read the **after**
   view. Reading a view must make no change.
2. For each N in 1..K and each action, on fresh layers: mount with ``N:action,count:FILE`` and run
   the operation in the test process (a plain user's in a forked child, as uid 1000).
   - kill-*: the operation fails (ENOTCONN); the dead mount is detached lazily; the view after a
     remount without faults must be exactly the before or the after view. For a situation on a
     partial file (``mtime_may_change``), also the before view with that file's mtime changed:
     a write whose blocks were never recorded (each write request records them before it is
     answered, layer-format.md 11b) is lost but its mtime is not, as on any filesystem, and
     completing a file in place copies data before it sets the times back. For a write(2) into a
     partial file that the kernel sends as several requests (split at page boundaries:
     ``lands_in_part``), also the before view with a prefix of the write landed, as a write(2)
     in flight may land in part on any filesystem.
   - errno: the operation must fail with exactly that errno, and the view (live, and after a
     remount) must be the before view (with the same allowance for a partial file's mtime);
     or, if the operation succeeded (the failed step was a best-effort one after the commit
     point), the after view. The two are counted separately.
   - always: the N-th change is the count run's N-th (else the run diverged); the lower layer is
     unchanged byte for byte (tree_state, with ctimes); after the final unmount ``cowfs check
     UPPER --lower LOWER`` exits 0 with "no problems found", and the work directory's tmp/ is
     empty after a clean remount and unmount.

The view compared: for every path, its type, mode, uid, gid, size, sha256 of content, symlink
target, st_nlink of non-directories, user.* xattrs (those the mount shows), and mtime of
non-directories.
Every non-directory in the layers has a fixed old mtime; an mtime the operation set to "now" (after
2020) is compared as RECENT, since every run sets another "now". Deliberately out of scope: atime,
ctime, directory times, st_ino (inode numbers are kept by origins, which has its own tests), and
the page cache's view of a file open across the crash.

Not counted as changes (they do not go through a realfs change wrapper): file data written through
an open handle (handles.py: pwrite, fdatasync, fsync), the truncation done by opening an upper file
with O_TRUNC (vfs.py, through ``realfs.reopen``), fsyncdir (vfs.py), the content of a stray-whiteout
note (workdir.py, written into a file made by ``realfs.create_file``), and what mounting does (the
work dir probes and recovery, before arming). A fault can therefore not be placed inside those.

Selection: kill-after N is the same layer state as kill-before N+1, so kill-before at every N plus
kill-after at K already reaches every crash state. ``make test`` runs the smoke situations
(``smoke=True``, one or two per kind of operation, among them every case the issue reports) with
kill-before at every N, and kill-after and ENOSPC at the last change: 75 cases, measured at 100
to 195 seconds on two shared cores (ten minutes under a load average of 10).
Everything else, every situation with every action at every N (about 3,000 cases), is marked
``faults_full`` and runs with ``make faults`` (hours; ``PYTEST_ARGS='-k kill-before'`` and the like
select a part). The counts (operations, situations, injection points, cases passed and failed by
kind) are printed at the end of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faults_support import (
    ACTIONS,
    KILL_AFTER,
    KILL_BEFORE,
    SITUATIONS,
    Reference,
    Runner,
    Situation,
    Tally,
)

#: The default selection: (action, which N) for the smoke situations; "all" or "last".
SMOKE = {KILL_BEFORE: "all", KILL_AFTER: "last", "ENOSPC": "last"}


def _params() -> Iterator[object]:
    for situation in SITUATIONS.values():
        for action in ACTIONS:
            if situation.smoke and action in SMOKE:
                yield pytest.param(situation.id, action, SMOKE[action],
                                   id=f"{situation.id}-{action}")
                if SMOKE[action] == "all":
                    continue
            yield pytest.param(situation.id, action, "all", id=f"{situation.id}-{action}-full",
                               marks=pytest.mark.faults_full)


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tally]:
    """The counts, printed at the end of the module (past pytest's output capture) and written to
    faults-summary.txt in pytest's base temporary directory."""
    counts = Tally()
    yield counts
    if not counts.kinds:
        return
    lines = counts.lines()
    path = tmp_path_factory.getbasetemp() / "faults-summary.txt"
    path.write_text("\n".join(lines) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            for line in [*lines, f"(also in {path})"]:
                reporter.write_line(line)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory, cowfs_cmd: Path) -> Iterator[Runner]:
    run = Runner(tmp_path_factory.mktemp("faults"), cowfs_cmd)
    yield run
    run.close()


@pytest.fixture(scope="module")
def reference(runner: Runner) -> Callable[[Situation], Reference]:
    """The count run of a situation, done once per module."""
    cache: dict[str, Reference] = {}

    def get(situation: Situation) -> Reference:
        if situation.id not in cache:
            cache[situation.id] = runner.count(situation)
        return cache[situation.id]

    return get


@pytest.mark.timeout(1800)
@pytest.mark.parametrize(("situation_id", "action", "points"), list(_params()))
def test_fault(situation_id: str, action: str, points: str, runner: Runner,
               reference: Callable[[Situation], Reference], tally: Tally) -> None:
    situation = SITUATIONS[situation_id]
    ref = reference(situation)
    tally.points[situation.id] = ref.k
    numbers = range(1, ref.k + 1) if points == "all" else [ref.k]
    failures = []
    for n in numbers:
        result = runner.case(situation, ref, n, action)
        tally.add(result)
        if not result.passed:
            failures.append(result.message())
    if failures:
        changes = "\n".join(f"  {line}" for line in ref.changes)
        pytest.fail(f"{len(failures)} of {len(numbers)} injection points failed for "
                    f"{situation_id} with {action}; the count run's changes were:\n{changes}\n\n"
                    + "\n\n".join(failures), pytrace=False)
