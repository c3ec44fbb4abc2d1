"""The command line of the tools: one sub-parser and one handler per command.

:func:`add_parsers` is called by :func:`cowfs.cli.build_parser`. Handlers raise
:class:`~cowfs.errors.CowfsError` for user errors; a non-zero status that is not an error (the
status of ``run``'s command, problems found by ``check``) leaves as ``SystemExit``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

LOWER_HELP = "the lower layers (topmost first); default: those of the running mount"


def _exit(status: int) -> None:
    if status:
        raise SystemExit(status)


def _confirm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="apply the plan without asking")
    p.add_argument("-n", "--dry-run", action="store_true", help="only show the plan")


def _parser(subparsers: Subparsers, name: str, help_text: str, description: str,
            epilog: str = "") -> argparse.ArgumentParser:
    return subparsers.add_parser(name, help=help_text, description=description, epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


# --- run -----------------------------------------------------------------------------------------

RUN_EPILOG = """\
examples:
  cowfs run /data -- ./job --in /data           the job sees a writable /data; changes discarded
  cowfs run --upper /tmp/ch /data -- make       changes kept in /tmp/ch (see 'cowfs diff')
  cowfs run --at /tmp/view /data -- sh          a shell in a view at /tmp/view; /data untouched
"""


def _cmd_run(args: argparse.Namespace) -> None:
    from .run import run

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    _exit(run(Path(args.base), command, upper=Path(args.upper) if args.upper else None,
              keep=args.keep, at=Path(args.at) if args.at else None))


def _add_run(subparsers: Subparsers) -> None:
    p = _parser(subparsers, "run", "run a command in a disposable writable view",
                "Mount BASE with a fresh upper (over BASE itself, or at --at PATH), run COMMAND "
                "in the view, unmount (also after Ctrl-C or a crash), print what changed, and "
                "discard or keep the changes. Exits with COMMAND's status.", RUN_EPILOG)
    p.add_argument("--upper", metavar="DIR",
                   help="keep the changes in DIR (default: a temporary directory)")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep", dest="keep", action="store_true", default=None,
                      help="keep the changes (the default with --upper)")
    keep.add_argument("--discard", dest="keep", action="store_false",
                      help="discard the changes (the default without --upper)")
    p.add_argument("--at", metavar="PATH",
                   help="mount the view at PATH instead of over BASE itself")
    p.add_argument("base", metavar="BASE")
    p.add_argument("command", metavar="-- COMMAND...", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_run)


# --- diff ----------------------------------------------------------------------------------------

DIFF_EPILOG = """\
codes: A added, M modified (content), m metadata only, D deleted,
       O opaque directory (replaces the lower one), T another kind of object, R renamed dir.
"""


def _cmd_diff(args: argparse.Namespace) -> None:
    from ..changes import anomaly_lines, render_json, render_text, visible_changes
    from ..mounts import layers_for
    from ..walk import walk

    layers = layers_for(args.target, args.lower)
    records = list(walk(layers.upper, layers.lowers, layers.work))
    changes = visible_changes(records)
    sys.stdout.write(render_json(changes) if args.json else render_text(changes))
    for problem in anomaly_lines(records):
        print(f"cowfs: warning: {problem} (see 'cowfs check')", file=sys.stderr)
    _exit(1 if args.exit_code and changes else 0)


def _add_diff(subparsers: Subparsers) -> None:
    p = _parser(subparsers, "diff", "show what an upper layer changes",
                "List what UPPER changes against its lower layers (or what the view at "
                "MOUNTPOINT changed), like 'git status --porcelain' and 'docker diff'.",
                DIFF_EPILOG)
    p.add_argument("target", metavar="UPPER|MOUNTPOINT")
    p.add_argument("--lower", metavar="LOWER[:LOWER...]", help=LOWER_HELP)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--exit-code", action="store_true",
                   help="exit with status 1 when there are changes")
    p.set_defaults(func=_cmd_diff)


# --- commit and reset ----------------------------------------------------------------------------


def _cmd_commit(args: argparse.Namespace) -> None:
    from ..workspace import commit

    commit(Path(args.upper), Path(args.into), yes=args.yes, dry_run=args.dry_run,
           relocate=args.relocate)


def _add_commit(subparsers: Subparsers) -> None:
    p = _parser(subparsers, "commit", "apply an upper's changes to a base directory",
                "Apply UPPER's changes to BASE (deletions, opaque directories, renamed "
                "directories and hard links included; each file replaced atomically), then empty "
                "UPPER. Shows the plan; applies it with --yes or when confirmed at a terminal. "
                "Refuses while UPPER is mounted or BASE is in use by a mount, when UPPER is not "
                "a cowfs upper or BASE is one, and when BASE is not the lower stack recorded on "
                "UPPER. Interrupted (Ctrl-C, SIGTERM, a crash, a failed step), it is finished by "
                "running the same command again; until then BASE is half-committed.")
    p.add_argument("upper", metavar="UPPER")
    p.add_argument("--into", metavar="BASE", required=True,
                   help="the directory the upper was layered on")
    p.add_argument("--relocate", action="store_true",
                   help="commit although BASE is not the lower stack recorded on UPPER (the "
                   "layers were moved on purpose)")
    _confirm_options(p)
    p.set_defaults(func=_cmd_commit)


def _cmd_reset(args: argparse.Namespace) -> None:
    from ..workspace import reset

    reset(Path(args.upper), args.paths, yes=args.yes, dry_run=args.dry_run)


def _add_reset(subparsers: Subparsers) -> None:
    p = _parser(subparsers, "reset", "throw away changes",
                "Throw away every change in UPPER, or those at and under each PATH (relative to "
                "the view's root). Shows the plan; applies it with --yes or when confirmed at a "
                "terminal. Refuses while UPPER is mounted, and a directory that is not a cowfs "
                "upper.")
    p.add_argument("upper", metavar="UPPER")
    p.add_argument("paths", metavar="PATH", nargs="*")
    _confirm_options(p)
    p.set_defaults(func=_cmd_reset)


# --- export and import ---------------------------------------------------------------------------


def _cmd_export(args: argparse.Namespace) -> None:
    from ..mounts import layers_for
    from .oci import export_layer

    layers = layers_for(args.target, args.lower)
    export_layer(layers.upper, layers.lowers, args.output, gzip_flag=args.gzip, work=layers.work)


def _add_export(subparsers: Subparsers) -> None:
    p = _parser(subparsers, "export", "write an upper as an OCI image layer tar",
                "Write UPPER (against its lowers) as an OCI image layer: '.wh.NAME' whiteouts, "
                "'.wh..wh..opq' opaque markers, renamed directories written whole, hard links "
                "as tar hard links, user xattrs as PAX records.")
    p.add_argument("target", metavar="UPPER|MOUNTPOINT")
    p.add_argument("--lower", metavar="LOWER[:LOWER...]", help=LOWER_HELP)
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="the tar to write ('-': stdout); gzip when it ends in .gz or .tgz")
    p.add_argument("--gzip", action="store_true", help="gzip whatever the name")
    p.set_defaults(func=_cmd_export)


def _cmd_import(args: argparse.Namespace) -> None:
    from .oci import import_layer

    import_layer(args.archive, Path(args.dir))


def _add_import(subparsers: Subparsers) -> None:
    p = _parser(subparsers, "import", "unpack an OCI image layer into a cowfs layer directory",
                "Unpack an OCI layer tar (plain or compressed; '-': stdin) into DIR, which must "
                "not exist or be empty, converting whiteouts and opaque markers to the cowfs "
                "layer format, so that it stacks as a lower: cowfs mount L3:L2:L1 UPPER MNT. "
                "Unsafe members (absolute paths, '..', escaping hard links, writes through "
                "symlinks) are refused; DIR is complete or untouched.")
    p.add_argument("archive", metavar="LAYER.tar")
    p.add_argument("dir", metavar="DIR")
    p.set_defaults(func=_cmd_import)


# --- status and check ----------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> None:
    from .status import status

    status(as_json_output=args.json)


def _add_status(subparsers: Subparsers) -> None:
    p = _parser(subparsers, "status", "list cowfs mounts and their changes",
                "List every cowfs mount on this machine with its layers, the upper's size, and "
                "how many objects were copied up, created, deleted and renamed.")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=_cmd_status)


def _cmd_check(args: argparse.Namespace) -> None:
    from ..layers import parse_lowers
    from ..upperinfo import recorded_lowers
    from .check import check

    lowers = parse_lowers(args.lower) if args.lower else recorded_lowers(Path(args.upper))
    _exit(check(Path(args.upper), lowers, repair=args.repair, yes=args.yes,
                dry_run=args.dry_run))


def _add_check(subparsers: Subparsers) -> None:
    p = _parser(subparsers, "check", "validate a layer and repair it",
                "Validate UPPER: leftovers of a crash in the work directory, whiteouts the mount "
                "cannot see, malformed or escaping redirects, whiteouts over nothing (with "
                "--lower), an unknown format version. Exit status 1 when problems remain.")
    p.add_argument("upper", metavar="UPPER")
    p.add_argument("--lower", metavar="LOWER[:LOWER...]",
                   help="the lower layers, to check whiteouts and redirect targets against "
                   "(default: the stack recorded on UPPER at its last mount)")
    p.add_argument("--repair", action="store_true", help="repair what can be repaired")
    _confirm_options(p)
    p.set_defaults(func=_cmd_check)


def add_parsers(subparsers: Subparsers) -> None:
    for add in (_add_run, _add_diff, _add_commit, _add_reset, _add_export, _add_import,
                _add_status, _add_check):
        add(subparsers)


__all__ = ["add_parsers"]
