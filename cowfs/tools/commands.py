"""The subcommands' table: one row (:class:`Command`) per command, naming the function that adds its
arguments and the handler that runs it; :data:`COMMANDS` holds the tools' rows, and
:func:`cowfs.cli.build_parser` adds ``mount`` and ``umount`` to them. A new command is one row
and its two functions, as a new mount option is one row of :data:`cowfs.daemon.mount.FLAGS`.
Handlers raise
:class:`~cowfs.core.errors.CowfsError` for user errors; a non-zero status that is not an error (the
status of ``run``'s command, problems found by ``check``) leaves as ``SystemExit``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.errors import CowfsError

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


@dataclass(frozen=True, slots=True)
class Command:
    """One row of the command table: ``cowfs NAME``, or an action of a family of commands
    (``cowfs layer NAME``: the family's row lists its ``actions`` and has no handler)."""

    name: str
    #: One line in the list of commands (``cowfs --help``).
    help: str
    #: The paragraph at the top of ``cowfs NAME --help``.
    description: str
    #: Adds the command's options and positionals to its parser.
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    #: Runs the command; raises :class:`CowfsError` for the user's errors.
    run: Callable[[argparse.Namespace], None] | None = None
    #: Examples and notes after the options (kept as written).
    epilog: str = ""
    #: A short usage line where argparse's would be long.
    usage: str | None = None
    #: What Ctrl-C leaves, said after "cowfs: interrupted (Ctrl-C); " (see :func:`cowfs.cli.main`).
    interrupted: str = "nothing was changed"
    actions: tuple[Command, ...] = ()


def add_commands(subparsers: Subparsers, commands: tuple[Command, ...]) -> None:
    """One sub-parser per row; a family's actions as sub-parsers of its own."""
    for command in commands:
        p = subparsers.add_parser(command.name, help=command.help,
                                  description=command.description, epilog=command.epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if command.usage:
            p.usage = command.usage
        if command.arguments:
            command.arguments(p)
        if command.actions:
            add_commands(p.add_subparsers(metavar="ACTION", required=True, parser_class=type(p)),
                         command.actions)
        else:
            p.set_defaults(func=command.run, interrupted=command.interrupted)


LOWER_HELP = "the lower layers (topmost first); default: those of the running mount"


def _exit(status: int) -> None:
    if status:
        raise SystemExit(status)


def _confirm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="apply the plan without asking")
    p.add_argument("-n", "--dry-run", action="store_true", help="only show the plan")


# --- run -----------------------------------------------------------------------------------------

RUN_EPILOG = """\
examples:
  cowfs run /data -- ./job --in /data           the job sees a writable /data; changes discarded
  cowfs run --upper /tmp/ch /data -- make       changes kept in /tmp/ch (see 'cowfs diff')
  cowfs run --at /tmp/view /data -- sh          a shell in a view at /tmp/view; /data untouched
  cowfs run --diff-out changes.json /data -- make    every change listed in changes.json

The summary on stderr counts the changes by kind and lists the first 20; --diff-out FILE
writes all of them (as 'cowfs diff' would: text, or JSON when FILE ends in .json or with
--diff-format json), also when they are discarded.
"""


def _cmd_run(args: argparse.Namespace) -> None:
    from .run import run

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    _exit(run(args.base, command, upper=Path(args.upper) if args.upper else None,
              keep=args.keep, at=Path(args.at) if args.at else None,
              diff_out=Path(args.diff_out) if args.diff_out else None,
              diff_json=args.diff_format == "json" if args.diff_format else None,
              excludes=args.exclude, private=not args.shared))


def _run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upper", metavar="DIR",
                   help="keep the changes in DIR (default: a temporary directory)")
    keep = p.add_mutually_exclusive_group()
    keep.add_argument("--keep", dest="keep", action="store_true", default=None,
                      help="keep the changes (the default with --upper)")
    keep.add_argument("--discard", dest="keep", action="store_false",
                      help="discard the changes (the default without --upper)")
    p.add_argument("--at", metavar="PATH",
                   help="mount the view at PATH instead of over BASE itself")
    p.add_argument("--shared", action="store_true",
                   help="mount the view where every process sees it (default: only COMMAND "
                   "and its children do, in a mount namespace of their own; root)")
    p.add_argument("--diff-out", metavar="FILE",
                   help="write every change to FILE (the summary lists only the first 20)")
    p.add_argument("--diff-format", choices=("text", "json"),
                   help="the format of --diff-out (default: json when FILE ends in .json)")
    _add_filters(p, "changes from the summary and --diff-out")
    p.add_argument("base", metavar="BASE[:LOWER...]",
                   help="the directory, or a stack of layers (topmost first) as for mount")
    p.add_argument("command", metavar="-- COMMAND...", nargs=argparse.REMAINDER)


# --- diff ----------------------------------------------------------------------------------------

DIFF_EPILOG = """\
codes: A added, M modified (content), m metadata only, D deleted,
       O opaque directory (replaces the lower one), T another kind of object, R renamed dir.

PATH and --exclude: paths are relative to the view's root; a change is listed when it is at or
under a PATH and neither its path nor a parent directory matches a PATTERN (a glob; a pattern
without '/' also matches a name at any depth, as in .gitignore).

examples:
  cowfs diff /tmp/changes                       every change in the upper /tmp/changes
  cowfs diff /mnt/data src docs/api             only under src/ and docs/api/
  cowfs diff /mnt/repo --exclude .git --exclude '*.pyc'    leave out git's objects and bytecode
"""


def _add_filters(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                   help=f"leave out {what} whose path or parent matches the glob PATTERN "
                   "(repeatable)")


def _selected_paths(paths: list[str]) -> list[str]:
    from .plans import relative_path

    return [relative_path(p) for p in paths]


def _cmd_diff(args: argparse.Namespace) -> None:
    try:
        _diff(args)
    except CowfsError as e:
        # With --exit-code, 1 means "there are changes": an error must not pass for one (2, as
        # diff(1) says "trouble").
        raise CowfsError(str(e), 2 if args.exit_code else e.exit_code) from None


def _diff(args: argparse.Namespace) -> None:
    from ..core.mounts import layers_for
    from .changes import anomaly_lines, render_json, render_text, select, visible_changes
    from .stack import is_stack, load
    from .walk import walk

    paths = _selected_paths(args.paths)
    target = args.target
    if args.lower is None and is_stack(target):  # a stack: its live upper's changes
        target = str(load(target).upper)
    layers = layers_for(target, args.lower)
    records = list(walk(layers.upper, layers.lowers, layers.work))
    changes = select(visible_changes(records), paths, args.exclude)
    sys.stdout.write(render_json(changes) if args.json else render_text(changes))
    for problem in anomaly_lines(records):
        print(f"cowfs: warning: {problem} (see 'cowfs check')", file=sys.stderr)
    _exit(1 if args.exit_code and changes else 0)


def _diff_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="UPPER|MOUNTPOINT",
                   help="an upper, a cowfs mountpoint, or a stack ('cowfs layer': its live "
                   "upper)")
    p.add_argument("paths", metavar="PATH", nargs="*",
                   help="only changes at or under PATH (relative to the view's root)")
    _add_filters(p, "changes")
    p.add_argument("--lower", metavar="LOWER[:LOWER...]", help=LOWER_HELP)
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--exit-code", action="store_true",
                   help="exit with status 1 when there are changes, 2 on an error")


# --- commit and reset ----------------------------------------------------------------------------


COMMIT_EPILOG = """\
A plan of more than 20 lines is shown as a summary (steps by kind, bytes, largest files);
--dry-run shows all of it and applies nothing, --verbose shows all of it and applies it.

examples:
  cowfs commit /tmp/changes --into /data --dry-run    see what would change in /data
  cowfs commit /tmp/changes --into /data --yes        apply it (run again if interrupted)
"""


def _cmd_commit(args: argparse.Namespace) -> None:
    from .workspace import commit

    commit(Path(args.upper), Path(args.into), yes=args.yes, dry_run=args.dry_run,
           relocate=args.relocate, verbose=args.verbose)


def _commit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("upper", metavar="UPPER")
    p.add_argument("--into", metavar="BASE", required=True,
                   help="the directory the upper was layered on")
    p.add_argument("--relocate", action="store_true",
                   help="commit although BASE is not the lower stack recorded on UPPER, or "
                   "UPPER records none (the layers were moved on purpose, or the upper was made "
                   "by hand)")
    _confirm_options(p)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="show the whole plan, not its summary, also when applying it")


RESET_EPILOG = """\
examples:
  cowfs reset /tmp/changes --dry-run                 what would be thrown away
  cowfs reset /tmp/changes src/generated --yes       only the changes at and under src/generated
"""


def _cmd_reset(args: argparse.Namespace) -> None:
    from .workspace import reset

    reset(Path(args.upper), args.paths, yes=args.yes, dry_run=args.dry_run)


def _reset_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("upper", metavar="UPPER")
    p.add_argument("paths", metavar="PATH", nargs="*")
    _confirm_options(p)


# --- export and import ---------------------------------------------------------------------------


EXPORT_EPILOG = """\
examples:
  cowfs export /tmp/changes -o layer.tar.gz          the upper against its recorded lowers
  cowfs export /mnt/view -o - | cowfs import - /srv/l3    a running view's changes, streamed
"""


def _cmd_export(args: argparse.Namespace) -> None:
    from ..core.mounts import layers_for
    from .oci import export_layer
    from .stack import export_frozen, frozen_layer

    if args.lower is None and frozen_layer(args.target):
        export_frozen(Path(args.target), args.output, gzip_flag=args.gzip)
        return
    layers = layers_for(args.target, args.lower)
    export_layer(layers.upper, layers.lowers, args.output, gzip_flag=args.gzip, work=layers.work)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="UPPER|MOUNTPOINT")
    p.add_argument("--lower", metavar="LOWER[:LOWER...]", help=LOWER_HELP)
    p.add_argument("-o", "--output", metavar="FILE", required=True,
                   help="the tar to write ('-': stdout); gzip when it ends in .gz or .tgz")
    p.add_argument("--gzip", action="store_true", help="gzip whatever the name")


IMPORT_EPILOG = """\
examples:
  cowfs import layer.tar.gz /srv/layers/l2           then: cowfs mount /srv/layers/l2:/srv/base ...
  zcat layer.tar.gz | cowfs import - /srv/layers/l2  from stdin
"""


def _cmd_import(args: argparse.Namespace) -> None:
    from .oci import import_layer

    import_layer(args.archive, Path(args.dir))


def _import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("archive", metavar="LAYER.tar")
    p.add_argument("dir", metavar="DIR")


# --- image export and import --------------------------------------------------------------------


IMAGE_EPILOG = """\
examples:
  cowfs image export /srv/layers/app:/srv/layers/base --to /srv/app.oci    an OCI image layout
  cowfs image export /srv/layers/app:/srv/layers/base --to app.tar --tag app:1   for podman load
  cowfs image import app.tar --into /srv/layers      prints the stack: /srv/layers/ab12...:...
"""

IMAGE_EXPORT_EPILOG = """\
examples:
  cowfs image export /srv/layers/app:/srv/layers/base --to /srv/app.oci
  cowfs image export --upper /tmp/ws.upper /srv/layers/base --to ws.tar --tag ws:latest
"""

IMAGE_IMPORT_EPILOG = """\
examples:
  cowfs image import app.tar --into /srv/layers
  cowfs mount "$(cowfs image import /srv/app.oci --into /srv/layers)" /tmp/up /tmp/mnt
"""


def _cmd_image_export(args: argparse.Namespace) -> None:
    from .image_export import export_image, output_format, stack_layers

    export_image(stack_layers(args.stack, args.upper), args.to,
                 fmt=output_format(args.to, args.format), tag=args.tag)


def _cmd_image_import(args: argparse.Namespace) -> None:
    from .image_import import import_image

    import_image(args.image, Path(args.into))


def _image_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", metavar="LOWER[:LOWER...]", nargs="?",
                        help="the layers, topmost first (default with --upper: its recorded "
                        "lowers), or a layer stack (cowfs layer): its frozen layers and base")
    p.add_argument("--upper", metavar="UPPER",
                        help="an upper (or a mountpoint) to export on top of the stack, with "
                        "its own work directory")
    p.add_argument("--to", "-o", dest="to", metavar="OUT", required=True,
                        help="the image layout directory to create, or the archive to write")
    p.add_argument("--format", choices=("oci", "docker-archive"),
                        help="oci: an image layout directory (gzip layers); docker-archive: a "
                        "tar for podman load/docker load (default: docker-archive when OUT ends "
                        "in .tar, else oci)")
    p.add_argument("--tag", metavar="NAME",
                        help="the image's name (RepoTags; the layout's ref.name annotation)")


def _image_import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="ARCHIVE|LAYOUT")
    p.add_argument("--into", metavar="DIR", required=True,
                     help="the directory of layers (created when missing)")


# --- status and check ----------------------------------------------------------------------------


def _cmd_status(args: argparse.Namespace) -> None:
    from .status import status

    status(as_json_output=args.json)


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON for scripts")


def _cmd_check(args: argparse.Namespace) -> None:
    from ..core.layers import parse_lowers
    from ..core.upperinfo import recorded_lowers
    from .check import check

    lowers = parse_lowers(args.lower) if args.lower else recorded_lowers(Path(args.upper))
    _exit(check(Path(args.upper), lowers, repair=args.repair, yes=args.yes,
                dry_run=args.dry_run))


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("upper", metavar="UPPER")
    p.add_argument("--lower", metavar="LOWER[:LOWER...]",
                   help="the lower layers, to check whiteouts and redirect targets against "
                   "(default: the stack recorded on UPPER at its last mount)")
    p.add_argument("--repair", action="store_true", help="repair what can be repaired")
    _confirm_options(p)


# --- layer stacks --------------------------------------------------------------------------------

LAYER_EPILOG = """\
A stack is a directory: frozen read-only layers (STACK/layers/HEX, HEX the hex of the layer's
diff_id, the sha256 of its OCI layer tar as 'cowfs export STACK/layers/HEX' writes it), a live
upper on top (STACK/upper), and their order in STACK/stack.json. 'cowfs run STACK -- COMMAND'
and 'cowfs mount STACK MOUNTPOINT' use it; 'cowfs layer list --lowers STACK' prints the lowers
for the kernel's lowerdir= or 'cowfs mount LOWERS UPPER MOUNTPOINT'.

examples:
  cowfs layer init /srv/app /srv/rootfs          a stack over the directory /srv/rootfs
  cowfs run /srv/app -- make install             changes kept in the stack's live upper
  cowfs layer freeze /srv/app                    they become a layer; a fresh upper on top
  cowfs layer list /srv/app                      the layers, topmost first
  cowfs layer squash /srv/app                    all layers into one, with the same view
  cowfs layer remove /srv/app 3f2a               drop the topmost layer (a digest prefix)
"""


def _cmd_layer_init(args: argparse.Namespace) -> None:
    from .stack import init

    init(Path(args.stack), args.base)


def _cmd_layer_freeze(args: argparse.Namespace) -> None:
    from .stack import freeze

    freeze(Path(args.stack))


def _cmd_layer_list(args: argparse.Namespace) -> None:
    from .stack import list_stack

    list_stack(Path(args.stack), as_json=args.json, lowers_only=args.lowers)


def _cmd_layer_squash(args: argparse.Namespace) -> None:
    from .stack import squash

    squash(Path(args.stack), args.layers)


def _cmd_layer_remove(args: argparse.Namespace) -> None:
    from .stack import remove

    remove(Path(args.stack), args.layer)


def _layer_init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", metavar="STACK")
    p.add_argument("base", metavar="BASE[:LOWER...]", nargs="?")


def _layer_freeze_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", metavar="STACK")


def _layer_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", metavar="STACK")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument("--lowers", action="store_true",
                     help="print only the lower layers, topmost first, ':'-separated")


def _layer_squash_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", metavar="STACK")
    p.add_argument("layers", metavar="LAYER", nargs="*",
                        help="a diff_id or a unique prefix of its hex digits")


def _layer_remove_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("stack", metavar="STACK")
    p.add_argument("layer", metavar="LAYER", help="a diff_id or a unique prefix of its hex")


#: The tools' commands, in the order ``cowfs --help`` lists them (after mount and umount).
COMMANDS: tuple[Command, ...] = (
    Command(
        "run", "run a command in a disposable writable view",
        "Mount BASE with a fresh upper (over BASE itself, or at --at PATH), run COMMAND in the "
        "view, unmount (also after Ctrl-C or a crash), print what changed, and discard or keep "
        "the changes. Exits with COMMAND's status.",
        arguments=_run_arguments,
        run=_cmd_run,
        epilog=RUN_EPILOG,
        usage=("cowfs run [--upper DIR] [--keep | --discard] [--at PATH] [--shared]\n"
               "                 [--diff-out FILE] [--exclude PATTERN]... BASE[:LOWER...] -- "
               "COMMAND..."),
        interrupted=("the view was unmounted; its changes were discarded unless kept (--upper, "
                     "--keep)")),
    Command(
        "diff", "show what an upper layer changes",
        "List what UPPER changes against its lower layers (or what the view at MOUNTPOINT "
        "changed), like 'git status --porcelain' and 'docker diff'; with PATHs, only the changes "
        "at or under them.",
        arguments=_diff_arguments,
        run=_cmd_diff,
        epilog=DIFF_EPILOG),
    Command(
        "commit", "apply an upper's changes to a base directory",
        "Apply UPPER's changes to BASE (deletions, opaque directories, renamed directories and "
        "hard links included; each file replaced atomically), then empty UPPER. Shows the plan; "
        "applies it with --yes or when confirmed at a terminal. Refuses while UPPER is mounted "
        "or BASE is in use by a mount, when UPPER is not a cowfs upper or BASE is one, and when "
        "BASE is not the lower stack recorded on UPPER (or UPPER records none). Interrupted "
        "(Ctrl-C, SIGTERM, a crash, a failed step), it is finished by running the same command "
        "again; until then BASE is half-committed.",
        arguments=_commit_arguments,
        run=_cmd_commit,
        epilog=COMMIT_EPILOG,
        interrupted="nothing was changed: the plan was not applied"),
    Command(
        "reset", "throw away changes",
        "Throw away every change in UPPER, or those at and under each PATH (relative to the "
        "view's root). Shows the plan; applies it with --yes or when confirmed at a terminal. "
        "Refuses while UPPER is mounted, and a directory that is not a cowfs upper.",
        arguments=_reset_arguments,
        run=_cmd_reset,
        epilog=RESET_EPILOG,
        interrupted=("some of the changes may already be discarded; 'cowfs diff UPPER' shows what "
                     "is left")),
    Command(
        "export", "write an upper as an OCI image layer tar",
        "Write UPPER (against its lowers) as an OCI image layer: '.wh.NAME' whiteouts, "
        "'.wh..wh..opq' opaque markers, renamed directories written whole, hard links as tar "
        "hard links, user xattrs as PAX records. On a terminal, a progress bar of the bytes "
        "written.",
        arguments=_export_arguments,
        run=_cmd_export,
        epilog=EXPORT_EPILOG,
        interrupted="no output was written"),
    Command(
        "import", "unpack an OCI image layer into a cowfs layer directory",
        "Unpack an OCI layer tar (plain or compressed; '-': stdin) into DIR, which must not "
        "exist or be empty, converting whiteouts and opaque markers to the cowfs layer format, "
        "so that it stacks as a lower: cowfs mount L3:L2:L1 UPPER MNT. Unsafe members (absolute "
        "paths, '..', escaping hard links, writes through symlinks) are refused; DIR is complete "
        "or untouched. On a terminal, a progress bar of the archive's bytes read.",
        arguments=_import_arguments,
        run=_cmd_import,
        epilog=IMPORT_EPILOG,
        interrupted="DIR was not created"),
    Command(
        "image", "export a stack as an OCI image, import one as a stack",
        "Share a stack of layers as an OCI image (an image layout directory, or an archive that "
        "podman load and docker load take), and import one (a layout, or a docker save or podman "
        "save archive) as a stack of cowfs layers.",
        epilog=IMAGE_EPILOG,
        actions=(
            Command(
                "export", "write a stack as an OCI image",
                "Write the stack LOWER[:LOWER...] (topmost first, as for mount; with --upper, "
                "that upper on top of it) as an OCI image: one layer per layer, each as 'cowfs "
                "export' writes it against the layers below, made canonical so that the same "
                "stack gives the same digests.",
                arguments=_image_export_arguments,
                run=_cmd_image_export,
                epilog=IMAGE_EXPORT_EPILOG,
                usage=("cowfs image export [--upper UPPER] [--format F] [--tag NAME] --to OUT "
                       "[LOWER[:LOWER...]]"),
                interrupted="no output was written"),
            Command(
                "import", "import an OCI image as a stack of layers",
                "Import the image in LAYOUT (an OCI image layout directory) or ARCHIVE (a docker "
                "save, podman save or cowfs image export archive) into DIR, one layer directory "
                "per layer named by its diff_id (DIR/HEX; layers already there are reused), "
                "after checking every blob's digest and every layer's diff_id, and print the "
                "stack, topmost first, as cowfs mount and cowfs run take it.",
                arguments=_image_import_arguments,
                run=_cmd_image_import,
                epilog=IMAGE_IMPORT_EPILOG,
                interrupted="no layer was left behind"),
        )),
    Command(
        "status", "list cowfs mounts and their changes",
        "List every cowfs mount on this machine with its layers, the upper's size, and how many "
        "objects were copied up, created, deleted and renamed.",
        arguments=_status_arguments,
        run=_cmd_status,
        epilog=("examples:\n  cowfs status\n  cowfs status --json | jq -r "
                "'.mounts[].mountpoint'    the mountpoints only\n")),
    Command(
        "check", "validate a layer and repair it",
        "Validate UPPER: leftovers of a crash in the work directory, whiteouts the mount cannot "
        "see, malformed or escaping redirects, whiteouts over nothing (with --lower), an unknown "
        "format version. Exit status 1 when problems remain.",
        arguments=_check_arguments,
        run=_cmd_check,
        epilog=("examples:\n  cowfs check /tmp/changes                   report problems\n  cowfs "
                "check /tmp/changes --repair --yes    and repair what can be repaired\n"),
        interrupted="with --repair, some repairs may be done: run the same command again"),
    Command(
        "layer", "layer stacks: freeze, list, squash and remove layers",
        "Layer stacks, as container images have them: freeze the live upper into a read-only "
        "layer and go on with a fresh upper on top (docker commit without a daemon), list the "
        "layers with their diff_ids, squash adjacent layers into one with the same view, remove "
        "the topmost layer.",
        epilog=LAYER_EPILOG,
        actions=(
            Command(
                "init", "make a new stack over a base",
                "Make a new stack at STACK (missing or empty) over BASE (a directory, or layers "
                "topmost first; none: an empty base).",
                arguments=_layer_init_arguments,
                run=_cmd_layer_init,
                epilog=("examples:\n  cowfs layer init /srv/app /srv/rootfs\n  cowfs layer init "
                        "/srv/scratch                 a stack from nothing\n"),
                interrupted=("the stack may be made in part: remove STACK and run the command "
                             "again")),
            Command(
                "freeze", "freeze the live upper into a layer",
                "Freeze STACK's live upper: its changes become a read-only layer on top of the "
                "stack, named by its diff_id, and a fresh upper goes on top. Refuses while the "
                "upper is mounted or holds no changes.",
                arguments=_layer_freeze_arguments,
                run=_cmd_layer_freeze,
                epilog="examples:\n  cowfs layer freeze /srv/app\n",
                interrupted="nothing was changed"),
            Command(
                "list", "list a stack's layers, topmost first",
                "List STACK's live upper (its changes), its frozen layers, topmost first "
                "(diff_id, bytes of file data, files), and its base.",
                arguments=_layer_list_arguments,
                run=_cmd_layer_list,
                epilog=("examples:\n  cowfs layer list /srv/app\n  cowfs mount $(cowfs layer list "
                        "--lowers /srv/app) /tmp/u /mnt/app\n")),
            Command(
                "squash", "squash adjacent layers into one",
                "Squash adjacent frozen layers of STACK (all of them without LAYER arguments) "
                "into one layer with the same merged view. Refuses while the upper is mounted or "
                "holds changes.",
                arguments=_layer_squash_arguments,
                run=_cmd_layer_squash,
                epilog=("examples:\n  cowfs layer squash /srv/app\n  cowfs layer squash /srv/app "
                        "3f2a 9c01       two adjacent layers\n"),
                interrupted="nothing was changed"),
            Command(
                "remove", "remove the topmost layer",
                "Remove LAYER from STACK; only the topmost layer, which nothing but the live "
                "upper stacks on, and only while that upper holds no changes.",
                arguments=_layer_remove_arguments,
                run=_cmd_layer_remove,
                epilog="examples:\n  cowfs layer remove /srv/app 3f2a\n",
                interrupted="nothing was changed"),
        )),
)

__all__ = ["COMMANDS", "Command", "add_commands"]
