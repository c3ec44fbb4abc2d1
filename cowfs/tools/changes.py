"""The walk's records as a user sees them (``cowfs diff``): as text (like ``docker diff`` /
``git status --porcelain``) or JSON, and the one-line summary that ``cowfs run`` prints.

Text: one line per change, a code letter, a space, the path (directories end in ``/``):

====  ===========================================================================
A     added
M     modified: content (file data, symlink target, device number)
m     modified: metadata only (mode, owner, times, xattrs)
D     deleted
O     an opaque directory: replaces the lower one, whose content is all gone
T     replaced by another kind of object (``T  path (dir -> file)``)
R     a renamed directory: ``R  old/ -> new/``
====  ===========================================================================

The whiteout left at a renamed directory's old name is not listed separately (the ``R`` line
says it). Paths with control characters, quotes, backslashes or bytes that are not UTF-8 are
quoted C-style, as git quotes them. Copied-up objects identical to their lower copy are not
changes and are not listed.

:func:`select` narrows the changes to paths and leaves out ``--exclude`` globs (``cowfs diff``,
``cowfs run``'s summary and ``--diff-out``).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from .walk import Added, Anomaly, Change, Deleted, Kind, Modified, Renamed, Replaced, Unchanged

Visible = Added | Modified | Deleted | Replaced | Renamed


def visible_changes(records: Iterable[Change]) -> list[Visible]:
    """The records a user calls changes: no unchanged copies, no anomalies, and no separate
    deletion for the old name of a renamed directory."""
    kept: list[Visible] = []
    for record in records:
        if not isinstance(record, Unchanged | Anomaly):
            kept.append(record)
    sources = {r.source for r in kept if isinstance(r, Renamed)}
    return [r for r in kept if not (isinstance(r, Deleted) and r.path in sources)]


def quote(path: str) -> str:
    raw = os.fsencode(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    escapes = {0x0A: "\\n", 0x09: "\\t", 0x22: '\\"', 0x5C: "\\\\"}
    out = []
    for byte in raw:
        if byte in escapes:
            out.append(escapes[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _shown(path: str, kind: Kind) -> str:
    return quote(path + "/" if kind is Kind.DIR and path != "." else path)


def line(record: Visible) -> str:
    match record:
        case Added(path=path, kind=kind):
            return f"A  {_shown(path, kind)}"
        case Modified(path=path, kind=kind, data=True):
            return f"M  {_shown(path, kind)}"
        case Modified(path=path, kind=kind):
            return f"m  {_shown(path, kind)}"
        case Deleted(path=path, kind=kind):
            return f"D  {_shown(path, kind)}"
        case Replaced(path=path, kind=Kind.DIR, was=Kind.DIR):
            return f"O  {_shown(path, Kind.DIR)}"
        case Replaced(path=path, kind=kind, was=was):
            return f"T  {_shown(path, kind)} ({was.value} -> {kind.value})"
        case Renamed(path=path, source=source):
            return f"R  {_shown(source, Kind.DIR)} -> {_shown(path, Kind.DIR)}"
    raise AssertionError(f"unknown record {record!r}")


def change_name(record: Visible) -> str:
    match record:
        case Added():
            return "added"
        case Modified(data=True):
            return "modified"
        case Modified():
            return "metadata"
        case Deleted():
            return "deleted"
        case Replaced():
            return "replaced"
        case Renamed():
            return "renamed"
    raise AssertionError(f"unknown record {record!r}")


def as_json(record: Visible) -> dict[str, Any]:
    kind = Kind.DIR if isinstance(record, Renamed) else record.kind
    out: dict[str, Any] = {"change": change_name(record), "path": record.path, "kind": kind.value}
    if isinstance(record, Replaced):
        out["was"] = record.was.value
    if isinstance(record, Renamed):
        out["from"] = record.source
        out["metadata"] = record.metadata
    if isinstance(record, Added | Modified) and record.hardlink_of is not None:
        out["hardlink_of"] = record.hardlink_of
    return out


def counts(records: Sequence[Visible]) -> Counter[str]:
    return Counter(change_name(r) for r in records)


_ORDER = ("added", "modified", "metadata", "deleted", "replaced", "renamed")


def summary(records: Sequence[Visible]) -> str:
    """``3 added, 1 modified, 2 deleted`` (or ``no changes``)."""
    found = counts(records)
    parts = [f"{found[name]} {name if name != 'metadata' else 'metadata only'}"
             for name in _ORDER if found[name]]
    return ", ".join(parts) if parts else "no changes"


def render_text(records: Sequence[Visible]) -> str:
    return "".join(line(r) + "\n" for r in records)


def render_json(records: Sequence[Visible]) -> str:
    found = counts(records)
    document = {"changes": [as_json(r) for r in records],
                "summary": {name: found[name] for name in _ORDER}}
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _matches(path: str, pattern: str) -> bool:
    """``pattern`` (a glob) matches ``path`` or one of its parent directories; a pattern without
    ``/`` also matches a single name at any depth (as in .gitignore)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
        return True
    return "/" not in pattern and any(fnmatch.fnmatchcase(name, pattern) for name in parts)


def _under(path: str, top: str) -> bool:
    return top == "." or path == top or path.startswith(top + "/")


def select(records: Sequence[Visible], paths: Sequence[str] = (),
           excludes: Sequence[str] = ()) -> list[Visible]:
    """The changes at or under one of ``paths`` (all when none; relative to the view's root,
    normalised) and matching none of the ``excludes`` globs. A renamed directory is selected by
    its new or its old name."""
    def wanted(record: Visible) -> bool:
        names = [record.path, record.source] if isinstance(record, Renamed) else [record.path]
        if paths and not any(_under(n, top) for n in names for top in paths):
            return False
        return not any(_matches(record.path, pattern) for pattern in excludes)

    return [r for r in records if wanted(r)]


def anomaly_lines(records: Iterable[Change]) -> list[str]:
    return [f"{quote(r.path)}: {r.problem.value}" + (f" ({r.detail})" if r.detail else "")
            for r in records if isinstance(r, Anomaly)]
