"""``cowfs status``: every cowfs mount on this machine, its layers, the upper's size and how many
objects were copied up, created and deleted.

Mounts are found from the daemons' state files (see :class:`cowfs.daemon.mount.MountState`) and
checked against the mount table; a cowfs mount without a state file is listed with unknown layers,
and a state file whose daemon is gone is listed as stale. The counts come from the layer walk, read
while the mount runs: they are a snapshot, exact only when nothing is writing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..core import mounts, schema
from ..core.dirstack import tree
from ..core.errors import CowfsError
from .plans import human_bytes
from .walk import Added, Deleted, Modified, Renamed, Replaced, Unchanged, walk


@dataclass(frozen=True, slots=True)
class MountStatus:
    mountpoint: str
    pid: int | None
    lowers: tuple[str, ...]
    upper: str | None
    state: str  # "mounted", "dead", "stale" or "no state file"
    upper_bytes: int | None = None
    copied_up: int = 0
    created: int = 0
    deleted: int = 0
    renamed: int = 0
    error: str | None = None
    #: The mount's flags from the mount table (``rw``, ``nosuid``, ``nodev``, ``relatime``, ...).
    flags: tuple[str, ...] = ()
    #: A background daemon's default log file, when there is one (``--log`` is not recorded).
    log: str | None = None


def upper_size(upper: Path) -> int:
    """Bytes the upper's objects occupy (each inode once), the work directory left out."""
    seen: set[tuple[int, int]] = set()
    total = 0
    try:
        fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        with contextlib.suppress(OSError):
            for _, st in tree(fd, skip=lambda path: path == schema.WORK_DIR_NAME):
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
    finally:
        os.close(fd)
    return total


def _dead(mount: mounts.RunningMount) -> MountStatus | None:
    """A mount whose daemon is gone (killed, crashed): the kernel answers every request to it
    with ENOTCONN until it is unmounted."""
    if mount.alive or not mount.mounted or mounts.process_exists(mount.pid):
        return None
    try:
        os.statvfs(mount.mountpoint)  # always asks the daemon (a stat may be answered from cache)
        reason = "it is gone"
    except OSError as e:
        reason = f"it is gone; the mount answers {e.strerror!r}"
    return MountStatus(str(mount.mountpoint), mount.pid, tuple(map(str, mount.lowers)),
                       str(mount.upper), "dead",
                       error=f"the daemon (pid {mount.pid}) is not running: {reason}; "
                       f"'cowfs umount {mount.mountpoint}' removes the mount")


def _status_of(mount: mounts.RunningMount) -> MountStatus:
    dead = _dead(mount)
    if dead is not None:
        return dead
    base = MountStatus(str(mount.mountpoint), mount.pid, tuple(map(str, mount.lowers)),
                       str(mount.upper), "mounted" if mount.alive else "stale",
                       flags=mounts.mount_flags(mount.mountpoint) if mount.alive else ())
    if not mount.alive:
        return base
    try:
        upper = mounts.reachable_layer(mount, mount.upper)
        lowers = [mounts.reachable_layer(mount, p) for p in mount.lowers]
        found: Counter[str] = Counter()
        for record in walk(upper, lowers, mounts.reachable_layer(mount, mount.work)):
            match record:
                case Modified() | Unchanged() | Replaced():
                    found["copied_up"] += 1
                case Added():
                    found["created"] += 1
                case Deleted():
                    found["deleted"] += 1
                case Renamed():
                    found["renamed"] += 1
        return dataclasses.replace(base, upper_bytes=upper_size(upper),
                                   copied_up=found["copied_up"], created=found["created"],
                                   deleted=found["deleted"], renamed=found["renamed"])
    except (CowfsError, OSError) as e:
        return dataclasses.replace(base, error=str(e))


def _with_log(status: MountStatus) -> MountStatus:
    log = mounts.log_file(Path(status.mountpoint))
    return dataclasses.replace(status, log=str(log)) if log.is_file() else status


def collect() -> list[MountStatus]:
    running = mounts.running_mounts()
    statuses = [_with_log(_status_of(m)) for m in running]
    known = {str(m.mountpoint) for m in running if m.alive or m.mounted}
    for mnt in mounts.cowfs_mountpoints():
        if mnt not in known:
            known.add(mnt)
            statuses.append(MountStatus(mnt, None, (), None, "no state file"))
    return sorted(statuses, key=lambda s: s.mountpoint)


def render(statuses: list[MountStatus]) -> str:
    if not statuses:
        return "no cowfs mounts\n"
    lines = []
    for s in statuses:
        pid = f"pid {s.pid}, " if s.pid is not None else ""
        lines.append(f"{s.mountpoint}  ({pid}{s.state})")
        if s.upper is not None:
            lines.append(f"  lowers:  {':'.join(s.lowers)}")
            size = f"  ({human_bytes(s.upper_bytes)})" if s.upper_bytes is not None else ""
            lines.append(f"  upper:   {s.upper}{size}")
        if s.flags:
            lines.append(f"  flags:   {','.join(s.flags)}{_flags_note(s.flags)}")
        if s.error is not None:
            lines.append(f"  error:   {s.error}")
        elif s.state == "mounted" and s.upper is not None:
            lines.append(f"  changes: {s.copied_up} copied up, {s.created} created, "
                         f"{s.deleted} deleted, {s.renamed} renamed")
        if s.log is not None:
            lines.append(f"  log:     {s.log}")
    return "\n".join(lines) + "\n"


def _flags_note(flags: tuple[str, ...]) -> str:
    """What a FUSE default means for the user, and how to change it."""
    off = [f for f in ("nosuid", "nodev") if f in flags]
    if not off:
        return ""
    what = {"nosuid": "set-user-ID programs run without it",
            "nodev": "device files cannot be opened"}
    restore = ",".join(f.removeprefix("no") for f in off)
    return f"  ({'; '.join(what[f] for f in off)}: -o {restore} restores)"


def as_json(statuses: list[MountStatus]) -> str:
    def one(s: MountStatus) -> dict[str, Any]:
        return {"mountpoint": s.mountpoint, "pid": s.pid, "state": s.state,
                "lowers": list(s.lowers), "upper": s.upper, "upper_bytes": s.upper_bytes,
                "copied_up": s.copied_up, "created": s.created, "deleted": s.deleted,
                "renamed": s.renamed, "error": s.error, "flags": list(s.flags), "log": s.log}
    return json.dumps({"mounts": [one(s) for s in statuses]}, indent=2) + "\n"


def status(*, as_json_output: bool, out: TextIO | None = None) -> None:
    statuses = collect()
    (out or sys.stdout).write(as_json(statuses) if as_json_output else render(statuses))
