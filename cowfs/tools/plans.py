"""What the commands that change layers offline share: reaching a path under a layer root
without following symlinks, a plan shown (in full, or summarised) and confirmed, a progress bar
of bytes that shows only on a terminal, and what an interruption says.

Destructive commands compute a plan first and apply it only when asked (``--yes``, or a "y" typed
at a terminal), as overlayfs-tools do. Finding the layers of a mount and refusing a mounted upper
is :mod:`cowfs.core.mounts`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from ..core import realfs, schema
from ..core.errors import CowfsError


def _open_dir_nofollow(dirfd: int, name: str) -> int:
    return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)


@contextlib.contextmanager
def parent_of(root_fd: int, path: str) -> Iterator[tuple[int, str]]:
    """The parent directory of ``path`` under ``root_fd``, reached without following symlinks.

    ``path`` must be a plain relative path: an empty, ``.`` or ``..`` component (or a leading
    ``/``) is refused, since ``O_NOFOLLOW`` does not stop ``..`` from leaving the root."""
    if not schema.is_plain_relative(path):
        raise CowfsError(f"refusing the path {path[:200]!r}: it has an empty, '.' or '..' "
                         "component, or is absolute (it could leave the layer)")
    *dirs, name = path.split("/")
    fd = os.dup(root_fd)
    try:
        for component in dirs:
            child = _open_dir_nofollow(fd, component)
            os.close(fd)
            fd = child
        yield fd, name
    finally:
        os.close(fd)


def remove_if_present(dirfd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        realfs.remove_tree(dirfd, name)


def remove_path(path: Path) -> None:
    """Remove ``path`` and everything under it, if it is there (a tree of any depth, never
    following a symlink; what cannot be removed is left)."""
    with contextlib.suppress(OSError):
        parent = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            remove_if_present(parent, path.name)
        finally:
            os.close(parent)


# --- plans ---------------------------------------------------------------------------------------


#: A plan longer than this is shown as its summary unless the full plan is asked for.
FULL_PLAN_LINES = 20


def confirm(plan: Sequence[str], *, yes: bool, dry_run: bool, question: str,
            out: TextIO | None = None, summary: Sequence[str] = (),
            verbose: bool = False) -> bool:
    """Show ``plan`` (or, when it is long and neither ``dry_run`` nor ``verbose`` asks for all
    of it, its ``summary``); True when it is to be applied. Raises when nobody said yes."""
    out = out or sys.stdout
    shown = plan if (dry_run or verbose or not summary or len(plan) <= FULL_PLAN_LINES) \
        else [*summary, f"(the full plan, {len(plan)} lines: --dry-run or --verbose)"]
    for line in shown:
        print(line, file=out)
    if dry_run:
        return False
    if yes:
        return True
    if sys.stdin.isatty() and out.isatty():
        try:
            answer = input(f"{question} [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() in ("y", "yes"):
            return True
        raise CowfsError("cancelled; nothing was changed")
    raise CowfsError("not applied: pass --yes to apply this plan (or --dry-run to only show it)")


def human_bytes(n: int) -> str:
    """``512 B``, ``3.4 KiB``, ``420.0 MiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """Bytes done out of ``total`` bytes, as tqdm's bar on stderr with the rate and the time left;
    only when stderr is a terminal (a log, a pipe or a test's capture gets nothing).
    ``total`` None: unknown (a tar read from stdin): the bytes and the rate, no time left."""

    def __init__(self, total: int | None, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.done = 0
        self._bar: tqdm[Any] | None = None
        if self.stream.isatty() and total != 0:
            # A few columns short of the width: the "^C" the terminal echoes then does not wrap
            # the line, and the bar is cleared whole. A terminal that reports no size (a bare
            # pseudo-terminal) gets 80 columns (tqdm would draw an empty bar).
            columns = _columns(self.stream) or 80
            # unit "iB" with a divisor of 1024: "420MiB", "130MiB/s".
            self._bar = tqdm(total=total, desc=label, unit="iB", unit_scale=True,
                             unit_divisor=1024, file=self.stream, leave=False,
                             ncols=max(columns - 4, 40), nrows=24, mininterval=0.2)

    @property
    def enabled(self) -> bool:
        return self._bar is not None

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None and nbytes:
            self._bar.update(nbytes)

    def to(self, done: int) -> None:
        """Set the bytes done (a position in a file read from the start)."""
        self.advance(done - self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            # Also what the terminal echoed after the bar (a "^C"): the line is left empty.
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):
        return 0


def relative_path(path: str) -> str:
    """A user-given path inside the view, normalised; refuses anything that leaves it."""
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise CowfsError(f"path {path!r} leaves the layer ('..' is not allowed)")
    return "/".join(parts) or "."


# --- interruption --------------------------------------------------------------------------------


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived while a command was changing layers; raised in the main
    thread so that ``finally`` blocks remove temporary files."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Interrupted` for the block (SIGTERM would
    otherwise end the process without running any cleanup)."""

    def raise_interrupted(signum: int, _frame: object) -> None:
        raise Interrupted(signum)

    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, raise_interrupted) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def temporary_name(final: str, what: str) -> str:
    """The name of a temporary file or directory built beside ``final``: hidden, and carrying
    this process's id, so that :func:`remove_stale_temporaries` can tell a leftover of a killed
    run from one in progress."""
    return f".{final}.cowfs-{what}-{os.getpid()}"


def remove_stale_temporaries(directory: Path, final: str, what: str) -> None:
    """Remove what a killed run (SIGKILL, a crash) left beside ``final``: the temporaries named
    by :func:`temporary_name` whose process is gone."""
    prefix = f".{final}.cowfs-{what}-"
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            pid = entry.name.removeprefix(prefix)
            if entry.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
                remove_path(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fault_point(variable: str, count: int) -> None:
    """A seam for the tests only: when the environment variable ``variable`` is ``N:SIGNAL``
    and ``count`` is N, send SIGNAL (e.g. KILL, INT, TERM) to this process, as a user or a crash
    would at that point."""
    spec = os.environ.get(variable)
    if not spec:
        return
    at, _, name = spec.partition(":")
    if at.isdigit() and int(at) == count:
        os.kill(os.getpid(), signal.Signals["SIG" + (name or "KILL")])
