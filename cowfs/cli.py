"""The command line: ``cowfs mount``, ``cowfs umount``, and the ``mount.fuse.cowfs`` helper.

User errors are printed as one line (``cowfs: error: ...``) with a non-zero exit status; a traceback
means a bug in cowfs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .core import lifecycle, mounts
from .core.errors import CowfsError
from .core.layers import LayerPaths
from .tools.commands import COMMANDS as TOOL_COMMANDS
from .tools.commands import Command, add_commands

log = logging.getLogger("cowfs")

MOUNT_EPILOG = """\
options (-o, comma-separated, may be repeated):
  allow_other     let users other than the mounting one access the mount
  ro              mount read-only
  debug           log every request (implies --log to stderr in the foreground)
  timeout=SECS    how long the kernel may cache names, attributes and negative lookups
                  (default 86400: the layers must not change behind cowfs's back; 0 shows
                  such changes at once, at a large cost)
  volatile        skip fsync on copy-up (faster; a crash may lose copied-up data)
  writeback       the kernel's writeback cache (experimental; nowriteback is the default)
  metacopy        metadata changes of lower files copy no data until the first open for
                  writing (off by default, as in the kernel, whose overlayfs refuses such
                  an upper in userxattr mode)
  partial_copyup=SIZE  lower files of at least SIZE (default 64M) copy up only the blocks
                  written; nopartial_copyup copies whole files (a clone where the upper has
                  reflinks is used either way)
  relocate        the lower layers were moved on purpose: accept a lower stack other than
                  the one recorded on the upper at its last mount, and record the new one
  suid,dev        let set-user-ID programs and device files work (the default is nosuid,nodev)
  noexec,sync,dirsync,...  passed to the kernel
  relatime,noatime,strictatime,nodiratime  access times, as on any mount (relatime: default)

The default work directory is UPPER/.cowfs-work; it is never shown in the merged view.
A read-write mount records the lower stack (paths and identities) on the upper; a later mount
or commit over another stack is refused (see -o relocate), and 'cowfs diff UPPER' uses it.
LOWER may name several directories separated by ':', topmost first, as the kernel's lowerdir.
The layers must not be changed by anything but cowfs while mounted.

examples:
  cowfs mount /data /tmp/changes /mnt/data      overlay /data, changes go to /tmp/changes
  cowfs mount /data /tmp/changes /data          the same, mounted over /data itself
  cowfs mount L2:L1 upper mnt                   stack two read-only layers
  cowfs mount /srv/app /mnt/app                 a stack ('cowfs layer'): its layers and upper
"""


def _mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("lower", metavar="LOWER[:LOWER...]",
                   help="read-only layer(s), topmost first; or a stack ('cowfs layer')")
    p.add_argument("upper", metavar="UPPER", help="writable layer that receives all changes")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                   help="where the merged view appears")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr until unmounted")
    p.add_argument("--work", metavar="DIR",
                   help="work directory for atomic copy-up; must be on the upper's filesystem "
                   "(default: UPPER/.cowfs-work)")
    p.add_argument("-o", dest="options", metavar="OPT[,OPT...]", action="append", default=[],
                   help="mount options: MOUNT OPTIONS in cowfs(1), or docs/cli.md")
    p.add_argument("--log", metavar="FILE",
                   help="append the daemon's log to FILE (default in the background: a file "
                   "beside the mount's state file, shown by 'cowfs status')")


def _umount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECS",
                   help="how long to wait for the daemon to exit (default 30)")


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: options and positionals mix in any order (``cowfs reset UPPER
    --yes PATH`` as well as ``cowfs reset --yes UPPER PATH``), as in git and coreutils.

    A command with actions of its own (``cowfs image export``) mixes them in the action's parser.
    A command that takes a command line of its own (``run BASE -- COMMAND...``) mixes them before
    ``--``; without ``--``, everything after BASE is the command, as for ``env`` and ``sudo``.
    """

    _intermixing = False

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        if self._intermixing or self._subparsers is not None:
            # parse_known_intermixed_args calls back here; a command family (``cowfs layer
            # ACTION``, ``cowfs image export``) leaves the mixing to its actions' parsers, which
            # intermixing cannot reach (argparse cannot mix around a sub-command).
            return super().parse_known_args(args, namespace)
        arguments = list(sys.argv[1:] if args is None else args)
        rest = [a for a in self._get_positional_actions() if a.nargs == argparse.REMAINDER]
        if rest and "--" not in arguments:
            return super().parse_known_args(arguments, namespace)
        tail: list[str] = []
        if rest:
            split = arguments.index("--")
            arguments, tail = arguments[:split], arguments[split + 1:]
            rest[0].nargs = argparse.ZERO_OR_MORE
        self._intermixing = True
        try:
            parsed, extra = self.parse_known_intermixed_args(arguments, namespace)
        finally:
            self._intermixing = False
            if rest:
                rest[0].nargs = argparse.REMAINDER
        if rest:
            setattr(parsed, rest[0].dest, [*(getattr(parsed, rest[0].dest) or []), *tail])
        return parsed, extra


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cowfs", description="cowfs: a copy-on-write overlay filesystem (FUSE). Reads come "
        "from the topmost layer that has a name; all changes go to the upper layer; the lower "
        "layers are never modified.")
    parser.add_argument("--version", action="version", version=f"cowfs {__version__}")
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(
        metavar="COMMAND", required=True, parser_class=CommandParser)
    add_commands(subparsers, COMMANDS)
    return parser


def _setup_logging(debug: bool, log_file: str | None, foreground: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    if log_file:
        logging.basicConfig(filename=log_file, level=level, format=fmt)
    elif foreground:
        logging.basicConfig(stream=sys.stderr, level=level, format=fmt)
    else:
        logging.basicConfig(handlers=[logging.NullHandler()], level=level)


# --- mount --------------------------------------------------------------------------------------


def mount(lower: str, upper: str, mountpoint: str, *, work: str | None, options: list[str],
          foreground: bool, log_file: str | None) -> None:
    from .daemon import fusecheck
    from .daemon.mount import MountOptions, prepare, serve  # pyfuse3 only where it is needed

    opts = MountOptions.parse(options)
    privileged = opts.kernel & {"suid", "dev"} if os.geteuid() != 0 else frozenset()
    if privileged:
        # fusermount3 drops them for a plain user and says so only on the daemon's stderr.
        print(f"cowfs: warning: -o {','.join(sorted(privileged, reverse=True))} needs root "
              "(a plain user's FUSE mount is always nosuid,nodev); mounting without it",
              file=sys.stderr)
        opts = dataclasses.replace(opts, kernel=opts.kernel - privileged)
    paths = LayerPaths.parse(lower, upper, work)
    fusecheck.preflight(Path(mountpoint), allow_other=opts.allow_other)
    if foreground:
        _setup_logging(opts.debug, log_file, True)
        paths, stack, real_mountpoint = prepare(paths, Path(mountpoint), opts)
        serve(paths, stack, real_mountpoint, opts, ready=lambda: None)
        return
    paths, stack, real_mountpoint = prepare(paths, Path(mountpoint), opts)
    if log_file is None:  # a background daemon's log is kept by default, beside its state file
        default_log = mounts.log_file(real_mountpoint)
        default_log.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_file = str(default_log)
    lifecycle.daemonize(lambda ready: serve(paths, stack, real_mountpoint, opts, ready),
                        lambda: _setup_logging(opts.debug, log_file, False))
    # The kernel gives a FUSE root inode uid 0 until its first GETATTR and checks ownership on
    # that (a plain user's utimensat on the mount root would fail EPERM): ask once, now.
    with contextlib.suppress(OSError):
        os.stat(real_mountpoint)


def _cmd_mount(args: argparse.Namespace) -> None:
    lower, upper, mountpoint = args.lower, args.upper, args.mountpoint
    if mountpoint is None:  # cowfs mount STACK MOUNTPOINT
        from .tools import stack

        if not stack.is_stack(lower):
            raise CowfsError(f"{lower!r} is not a cowfs stack; give LOWER[:LOWER...] UPPER "
                             "MOUNTPOINT, or STACK MOUNTPOINT")
        found = stack.load(lower)
        lower, upper, mountpoint = found.lowers_spec(), str(found.upper), args.upper
    mount(lower, upper, mountpoint, work=args.work, options=args.options,
          foreground=args.foreground, log_file=args.log)


# --- umount -------------------------------------------------------------------------------------


def umount(mountpoint: str, timeout: float = 30.0) -> None:
    note = lifecycle.unmount(mountpoint, timeout)
    if note is not None:
        print(f"cowfs: note: {note}", file=sys.stderr)


def _cmd_umount(args: argparse.Namespace) -> None:
    umount(args.mountpoint, args.timeout)


#: Every command, one row each, in the order ``cowfs --help`` lists them: the mount's own two here,
#: the tools' from :data:`cowfs.tools.commands.COMMANDS`.
COMMANDS: tuple[Command, ...] = (
    Command(
        "mount", "mount an overlay",
        "Mount a copy-on-write overlay of LOWER with changes going to UPPER, at MOUNTPOINT. "
        "Returns once the filesystem is mounted and serving; the daemon runs in the background "
        "until 'cowfs umount MOUNTPOINT'.",
        arguments=_mount_arguments,
        run=_cmd_mount,
        epilog=MOUNT_EPILOG,
        usage=("cowfs mount [-f] [--work DIR] [-o OPT[,OPT...]] [--log FILE]\n"
               "                   LOWER[:LOWER...] UPPER MOUNTPOINT  |  STACK MOUNTPOINT"),
        interrupted=("the daemon may still mount in the background: see 'cowfs status', and "
                     "'cowfs umount MOUNTPOINT'")),
    Command(
        "umount", "unmount an overlay and wait for its daemon to exit",
        "Unmount the cowfs overlay at MOUNTPOINT and wait until its daemon has exited, so that "
        "the upper layer is complete and may be used.",
        arguments=_umount_arguments,
        run=_cmd_umount,
        epilog=("examples:\n  cowfs umount /mnt/data\n  cowfs umount --timeout 120 /mnt/busy"
                "          wait longer for a busy daemon\n"),
        interrupted="the unmount may still complete: see 'cowfs status'"),
    *TOOL_COMMANDS,
)


# --- entry points -------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except CowfsError as e:
        print(f"cowfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        # Ctrl-C where a command has no handling of its own: say what it leaves (each parser's
        # ``interrupted`` default); commands that change layers report their own state.
        state = getattr(args, "interrupted", "nothing was changed")
        # At a terminal the "^C" was echoed mid-line (e.g. after a [y/N] question).
        start = "\n" if sys.stderr.isatty() else ""
        print(f"{start}cowfs: interrupted (Ctrl-C); {state}", file=sys.stderr)
        return 130
    return 0


def _helper_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="mount.fuse.cowfs",
        description="mount(8) helper: mount -t fuse.cowfs -o lowerdir=A:B,upperdir=U,workdir=W "
        "cowfs MOUNTPOINT")
    p.add_argument("source", help="ignored (conventionally 'cowfs')")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-n", "-s", "-v", dest="ignored", action="store_true",
                   help="accepted from mount(8) and ignored")
    return p


def helper_arguments(source_options: list[str]) -> tuple[str, str, str | None, list[str]]:
    """Split kernel-style ``lowerdir=,upperdir=,workdir=`` from the other mount options."""
    layers: dict[str, str] = {}
    rest: list[str] = []
    for spec in source_options:
        for opt in filter(None, spec.split(",")):
            key, _, value = opt.partition("=")
            if key in ("lowerdir", "upperdir", "workdir"):
                layers[key] = value
            else:
                rest.append(opt)
    for required in ("lowerdir", "upperdir"):
        if required not in layers:
            raise CowfsError(f"missing mount option {required}=")
    return layers["lowerdir"], layers["upperdir"], layers.get("workdir"), rest


def mount_helper_main(argv: Sequence[str] | None = None) -> int:
    args = _helper_parser().parse_args(argv)
    try:
        if "remount" in ",".join(args.options).split(","):
            from .daemon.mount import remount  # pyfuse3 only where it is needed
            remount(Path(args.mountpoint), args.options)
            return 0
        lower, upper, work, rest = helper_arguments(args.options)
        mount(lower, upper, args.mountpoint, work=work, options=[",".join(rest)],
              foreground=False, log_file=None)
    except CowfsError as e:
        print(f"mount.fuse.cowfs: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
