"""Layer stacks: ``cowfs layer init|freeze|list|squash|remove`` (docker commit without a daemon).

A *stack* is a directory that holds read-only *frozen layers* and one live upper on top:

::

    STACK/stack.json          the record: {"version": 1, "layers": [HEX, ...], "base": [...]}
    STACK/layers/HEX/         a frozen layer; HEX is the hex of its diff_id (sha256)
    STACK/upper/              the live upper (a cowfs upper over the layers and the base)
    STACK/empty/              the lower of a stack that has neither layers nor a base

``layers`` are topmost first, as ``lowerdir=``; ``base`` are directories outside the stack under
the bottom layer (absolute paths, topmost first; may be empty). The record is untrusted input,
decoded with msgspec against exactly this schema (:class:`StackFile`).

**Identity.** A frozen layer's diff_id is the sha256 of its OCI layer tar as ``cowfs export
STACK/layers/HEX`` writes it (:mod:`cowfs.tools.layertar`): uncompressed, members depth-first with
names sorted, no root member, mtimes in whole seconds (clamped to ``SOURCE_DATE_EPOCH`` when
set), owners as numbers without names, xattrs sorted. The same content gives the same bytes.

**Why frozen layers are complete for the kernel.** Freezing and squashing both go through
``cowfs export`` of an upper (the walk gives metacopy and partial files their data, writes
renamed directories whole and drops cowfs's records) and ``cowfs import`` of that tar (0/0
device whiteouts, ``user.overlay.opaque``); the format marker on the layer root is removed. A
frozen layer holds no work directory, no ``user.cowfs.*`` xattr, no redirect, no metacopy file:
the kernel's overlayfs (``userxattr``) mounts a stack of them and shows cowfs's view.

**Squash** merges adjacent frozen layers into one directory with the overlay's rule (a whiteout
or a non-directory hides what is below; a directory over a directory merges unless opaque; a
directory over a non-directory becomes opaque), then exports that against the layers below it and
imports it, so the result is the layer one freeze of the same changes would have made: same
view, same diff_id.

For an image exporter or importer (``cowfs image``): :func:`stack_layers` gives the frozen
layers topmost first (path and diff_id), :func:`write_layer_tar` a layer's tar, whose sha256 is
its diff_id, and :func:`push_layer` adds a layer tar on top of a stack.

Known limits: the commands refuse a stack whose upper is mounted; ``squash`` and ``remove``
need an upper without changes (freeze them or ``cowfs reset`` first), since the upper's origins
and hard-link index name the layers it was made on; a crash between writing the record and
emptying the upper after a freeze leaves an upper whose recorded stack is the old one (the
mount then refuses it: ``cowfs reset --yes STACK/upper``, whose changes the new layer holds);
:func:`write_layer_tar` (:mod:`cowfs.tools.layertar`) keeps a descriptor open per directory
level and ``list`` counts files by path (``os.walk``): layers deeper than about 1,000 levels
fail there.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, TextIO

import msgspec

from ..core import mounts, schema, upperinfo
from ..core.errors import CowfsError
from ..core.wording import counted
from . import plans
from .changes import visible_changes
from .layertar import layer_digest, write_layer_tar
from .walk import walk

STACK_FILE = "stack.json"
LAYERS_DIR = "layers"
UPPER_DIR = "upper"
EMPTY_DIR = "empty"
STACK_VERSION = 1
DIGEST_PREFIX = "sha256:"

_Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class _StackJSON(msgspec.Struct, forbid_unknown_fields=True):
    version: int
    layers: list[_Hex]
    base: list[str]


@dataclass(frozen=True, slots=True)
class StackFile:
    """``STACK/stack.json``: the frozen layers (hex digests, topmost first) and the base
    directories under them (absolute, topmost first)."""

    layers: tuple[str, ...]
    base: tuple[str, ...]

    def to_json(self) -> bytes:
        return msgspec.json.encode(_StackJSON(STACK_VERSION, list(self.layers), list(self.base)))

    @classmethod
    def from_json(cls, value: bytes) -> StackFile:
        """Parse an (untrusted) record; ValueError says why it is refused."""
        data = schema.decode_record(value, _StackJSON, "stack file")
        if data.version != STACK_VERSION:
            raise ValueError(f"unknown stack file version {data.version!r}")
        if len(set(data.layers)) != len(data.layers):
            raise ValueError("malformed stack file: a layer listed twice")
        if any(not schema.is_plain_absolute(b) for b in data.base):
            raise ValueError("malformed stack file: a base that is not a plain absolute path")
        if len(data.layers) + len(data.base) > schema.LAYERS_MAX:
            raise ValueError(f"malformed stack file: more than {schema.LAYERS_MAX} layers")
        return cls(tuple(data.layers), tuple(data.base))


@dataclass(frozen=True, slots=True)
class StackLayer:
    """A frozen layer of a stack: its directory and its diff_id (``sha256:HEX``)."""

    path: Path
    diff_id: str


@dataclass(frozen=True, slots=True)
class Stack:
    root: Path
    record: StackFile

    @property
    def upper(self) -> Path:
        return self.root / UPPER_DIR

    def layer_path(self, hex_id: str) -> Path:
        return self.root / LAYERS_DIR / hex_id

    def lowers(self) -> tuple[Path, ...]:
        """What the upper stacks on, topmost first: the frozen layers, then the base."""
        found = tuple(self.layer_path(h) for h in self.record.layers)
        found += tuple(Path(b) for b in self.record.base)
        return found or (self.root / EMPTY_DIR,)

    def lowers_spec(self) -> str:
        return ":".join(str(p) for p in self.lowers())


def is_stack(path: Path | str) -> bool:
    """A directory holding a stack record (a regular file, not a symlink)."""
    with contextlib.suppress(OSError):
        return stat.S_ISREG(os.stat(Path(path) / STACK_FILE, follow_symlinks=False).st_mode)
    return False


def load(path: Path | str) -> Stack:
    root = Path(os.path.abspath(path))
    if not root.is_dir():
        raise CowfsError(f"stack {str(path)!r} does not exist" if not root.exists()
                         else f"stack {str(path)!r} is not a directory")
    try:
        fd = os.open(STACK_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    except FileNotFoundError:
        raise CowfsError(f"{str(path)!r} is not a cowfs stack (no {STACK_FILE}; make one with "
                         "'cowfs layer init STACK BASE')") from None
    except OSError as e:
        raise CowfsError(f"cannot read {str(root / STACK_FILE)!r}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        value = f.read(schema.RECORD_READ_MAX + 1)
    try:
        record = StackFile.from_json(value)
    except ValueError as e:
        raise CowfsError(f"{str(root / STACK_FILE)!r}: {e}") from None
    stack = Stack(root.resolve(), record)
    for hex_id in record.layers:
        if not stack.layer_path(hex_id).is_dir() or stack.layer_path(hex_id).is_symlink():
            raise CowfsError(f"stack {str(path)!r}: layer {hex_id[:12]} is missing "
                             f"({str(stack.layer_path(hex_id))!r})")
    return stack


def stack_layers(path: Path | str) -> list[StackLayer]:
    """The frozen layers of the stack at ``path``, topmost first (for an image exporter: each
    layer's tar is :func:`write_layer_tar` of its path, whose sha256 is its diff_id)."""
    stack = load(path)
    return [StackLayer(stack.layer_path(h), DIGEST_PREFIX + h) for h in stack.record.layers]


def _write_record(stack_root: Path, record: StackFile) -> None:
    """Atomically: a temporary file beside it, fsynced, renamed over it."""
    temp = stack_root / plans.temporary_name(STACK_FILE, "layer")
    with open(temp, "wb") as f:
        f.write(record.to_json() + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(temp, stack_root / STACK_FILE)


def frozen_layer(target: str) -> bool:
    """``target`` is a frozen layer of a stack (``STACK/layers/HEX``, listed in the record)."""
    path = Path(os.path.abspath(target))
    if path.parent.name != LAYERS_DIR or not is_stack(path.parent.parent):
        return False
    try:
        return path.name in load(path.parent.parent).record.layers
    except CowfsError:
        return False


def export_frozen(layer: Path, output: str, *, gzip_flag: bool = False,
                  out: TextIO | None = None) -> None:
    """``cowfs export STACK/layers/HEX``: the layer's canonical tar (gzip: with no name and
    time in its header, so that it is deterministic too)."""
    compress = gzip_flag or output.endswith((".gz", ".tgz"))
    if output == "-":
        if sys.stdout.isatty():
            raise CowfsError("refusing to write a tar archive to a terminal; use -o FILE")
        _write_maybe_gzip(layer, sys.stdout.buffer, compress)
        return
    target = Path(output)
    if target.is_dir():
        raise CowfsError(f"{output!r} is a directory; give the name of the tar file to write")
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True)
    temp = target.parent / plans.temporary_name(target.name, "export")
    try:
        with open(temp, "wb") as f:
            _write_maybe_gzip(layer, f, compress)
        os.rename(temp, target)
    except BaseException:
        plans.remove_path(temp)
        raise
    print(f"exported layer {DIGEST_PREFIX}{layer.name} to {output}", file=out or sys.stderr)


def _write_maybe_gzip(layer: Path, raw: IO[bytes], compress: bool) -> None:
    if not compress:
        write_layer_tar(layer, raw)
        return
    from .oci import gzip_writer

    with gzip_writer(raw) as zipped:
        write_layer_tar(layer, zipped)  # type: ignore[arg-type]


# --- admitting a layer: export, import, strip, name ------------------------------------------


def _strip_root(layer: Path) -> None:
    """What import leaves on the layer root for cowfs alone (the format marker): the kernel
    would show it."""
    with contextlib.suppress(OSError):
        os.removexattr(layer, schema.XATTR_FORMAT, follow_symlinks=False)


def _admit(stack: Stack, upper: Path, lowers: Sequence[Path], scratch: Path) -> str:
    """Export ``upper`` against ``lowers`` (the walk), import the tar, and move the layer into
    ``STACK/layers/HEX``; returns HEX."""
    from .oci import export_layer, import_layer

    tar = scratch / "layer.tar"
    quiet = io.StringIO()
    export_layer(upper, lowers, str(tar), out=quiet, work=schema.default_work_dir(upper))
    layer = scratch / "layer"
    import_layer(str(tar), layer, out=quiet)
    tar.unlink()
    return _place(stack, layer)


def _place(stack: Stack, layer: Path) -> str:
    """Name an imported layer by its diff_id and move it into ``STACK/layers/HEX``."""
    _strip_root(layer)
    hex_id = layer_digest(layer)
    if hex_id in stack.record.layers:
        raise CowfsError(f"a layer with the same content (sha256:{hex_id[:12]}) is already in "
                         "the stack")
    target = stack.layer_path(hex_id)
    (stack.root / LAYERS_DIR).mkdir(exist_ok=True)
    plans.remove_path(target)  # the leftover of an interrupted command: the record lacks it
    os.rename(layer, target)
    return hex_id


@contextlib.contextmanager
def _scratch(stack: Stack, what: str) -> Iterator[Path]:
    plans.remove_stale_temporaries(stack.root, what, "layer")
    scratch = stack.root / plans.temporary_name(what, "layer")
    scratch.mkdir(mode=0o700)
    try:
        with plans.interruptible():
            yield scratch
    except plans.Interrupted as e:
        raise CowfsError(f"{what} interrupted ({e}); the stack is as it was", e.exit_code) \
            from None
    except CowfsError as e:
        if e.exit_code - 128 not in {int(n) for n in signal.Signals}:
            raise
        # Interrupted inside export or import, which say so about their own (scratch) output.
        raise CowfsError(f"{what} interrupted ({signal.Signals(e.exit_code - 128).name}); the "
                         "stack is as it was", e.exit_code) from None
    finally:
        plans.remove_path(scratch)


def _add_on_top(stack: Stack, what: str, build: Callable[[Path], str]) -> str:
    """The layer ``build`` makes in a scratch directory (returning its HEX) goes on top of the
    stack, with a fresh upper over it."""
    with _scratch(stack, what) as scratch:
        hex_id = build(scratch)
        with _uninterrupted():
            _write_record(stack.root, StackFile((hex_id, *stack.record.layers),
                                                stack.record.base))
            _renew_upper(stack)
    return hex_id


def _renew_upper(stack: Stack) -> None:
    """A fresh, empty upper (the old one's recorded stack, origins and index name the layers it
    was made on)."""
    old = stack.root / plans.temporary_name(UPPER_DIR, "layer")
    mode = stat.S_IMODE(os.stat(stack.upper, follow_symlinks=False).st_mode)
    os.rename(stack.upper, old)
    stack.upper.mkdir(mode=0o700)
    os.chmod(stack.upper, mode)
    plans.remove_path(old)


def _changes(stack: Stack) -> int:
    """The live upper's visible changes over the stack (refusing an upper recorded on another
    stack: its changes mean something only there)."""
    recorded = upperinfo.recorded_lowers(stack.upper)
    lowers = stack.lowers()
    if recorded is not None and tuple(str(p) for p in recorded) != tuple(
            str(p.resolve()) for p in lowers):
        raise CowfsError(f"the upper {str(stack.upper)!r} was mounted on another stack "
                         f"({':'.join(map(str, recorded))}), not on this stack's layers")
    return len(visible_changes(walk(stack.upper, lowers)))


@contextlib.contextmanager
def _upper_held(stack: Stack, what: str) -> Iterator[None]:
    """The upper's lock, which every mount of it and every layer command holds: one command
    changes a stack at a time. Layer directories the record does not list (left by a command
    killed between moving a layer in and writing the record, or before deleting what a squash
    replaced) are removed first."""
    with mounts.exclusive_upper(stack.upper, what):
        upperinfo.refuse_if_committing(stack.upper, what)
        plans.remove_stale_temporaries(stack.root, UPPER_DIR, "layer")
        plans.remove_stale_temporaries(stack.root, STACK_FILE, "layer")
        layers = stack.root / LAYERS_DIR
        for name in os.listdir(layers) if layers.is_dir() else ():
            if name not in stack.record.layers:
                plans.remove_path(layers / name)
        yield


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done: the record and the fresh
    upper change together (a kill -9 between them is the known limit of the module)."""
    signums = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signums)


# --- the commands -------------------------------------------------------------------------------


def init(path: Path, base: str | None, *, out: TextIO | None = None) -> Stack:
    """A new stack at ``path`` (missing or an empty directory) over ``base`` (a directory or
    ``L1:L2``, topmost first; None: nothing)."""
    out = out or sys.stderr
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise CowfsError(f"{str(path)!r} exists and is not an empty directory")
    bases: tuple[str, ...] = ()
    if base:
        for part in base.split(":"):
            if not os.path.isdir(part):
                raise CowfsError(f"base directory {part!r} does not exist"
                                 if not os.path.exists(part) else f"base {part!r} is not a "
                                 "directory")
            if is_stack(part):
                raise CowfsError(f"base {part!r} is a stack; stack on its layers with "
                                 f"\"$(cowfs layer list --lowers {part})\", or freeze in it")
        bases = tuple(str(Path(p).resolve()) for p in base.split(":"))
        target = str(path.resolve())
        if any(target == b or target.startswith(b + "/") for b in bases):
            raise CowfsError(f"the stack {str(path)!r} would be inside its base; make it "
                             "elsewhere")
    path.mkdir(parents=True, exist_ok=True)
    for name in (LAYERS_DIR, UPPER_DIR, EMPTY_DIR):
        (path / name).mkdir(exist_ok=True)
    record = StackFile((), bases)
    _write_record(path, record)
    print(f"cowfs layer: stack {path} over {base or 'nothing'}; run in it with "
          f"'cowfs run {path} -- COMMAND'", file=out)
    return Stack(path.resolve(), record)


def freeze(path: Path, *, out: TextIO | None = None) -> StackLayer:
    """The live upper becomes a frozen layer on top of the stack; a fresh upper goes on top."""
    out = out or sys.stderr
    stack = load(path)
    with _upper_held(stack, "freeze the upper"):
        if not _changes(stack):
            raise CowfsError(f"the upper {str(stack.upper)!r} holds no changes; nothing to "
                             "freeze")
        hex_id = _add_on_top(stack, "freeze", lambda scratch: _admit(
            stack, stack.upper, stack.lowers(), scratch))
    print(f"froze {stack.upper} as layer {DIGEST_PREFIX}{hex_id}", file=out)
    return StackLayer(stack.layer_path(hex_id), DIGEST_PREFIX + hex_id)


def push_layer(path: Path, archive: str, *, out: TextIO | None = None) -> StackLayer:
    """An OCI layer tar (what ``cowfs import`` takes) as a new frozen layer on top of the
    stack, for an image importer: call it bottom layer first. The layer's diff_id is that of its
    canonical tar, which is the archive's own digest only when the archive was canonical."""
    from .oci import import_layer

    out = out or sys.stderr
    stack = load(path)
    with _upper_held(stack, "add a layer"):
        _refuse_changes(stack, "add a layer under it")
        def build(scratch: Path) -> str:
            import_layer(archive, scratch / "layer", out=io.StringIO())
            return _place(stack, scratch / "layer")

        hex_id = _add_on_top(stack, "push", build)
    print(f"added layer {DIGEST_PREFIX}{hex_id} to {stack.root}", file=out)
    return StackLayer(stack.layer_path(hex_id), DIGEST_PREFIX + hex_id)


@dataclass(frozen=True, slots=True)
class LayerInfo:
    diff_id: str
    path: str
    size: int
    files: int


def layer_info(layer: Path, hex_id: str) -> LayerInfo:
    """Size (bytes of regular files, each inode once) and files (non-directories, whiteouts
    left out) of a frozen layer."""
    size = files = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(layer):
        if dirpath == str(layer) and schema.WORK_DIR_NAME in dirnames:
            dirnames.remove(schema.WORK_DIR_NAME)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if schema.is_device_whiteout(st.st_mode, st.st_rdev) or (
                    stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0
                    and st.st_size == 0):
                continue
            files += 1
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                size += st.st_size
    return LayerInfo(DIGEST_PREFIX + hex_id, str(layer), size, files)


def list_stack(path: Path, *, as_json: bool = False, lowers_only: bool = False,
               out: TextIO | None = None) -> None:
    out = out or sys.stdout
    stack = load(path)
    if lowers_only:
        print(stack.lowers_spec(), file=out)
        return
    changes = _changes(stack) if not mounts.mounts_of_upper(stack.upper) else None
    infos = [layer_info(stack.layer_path(h), h) for h in stack.record.layers]
    if as_json:
        print(json.dumps({
            "stack": str(stack.root), "lowers": stack.lowers_spec(),
            "upper": {"path": str(stack.upper), "changes": changes,
                      "mounted": changes is None},
            "layers": [{"diff_id": i.diff_id, "path": i.path, "size": i.size, "files": i.files}
                       for i in infos],
            "base": list(stack.record.base)}, indent=2), file=out)
        return
    live = ("mounted" if changes is None else "no changes" if not changes
            else counted(changes, "change"))
    print(f"{'LAYER':<20} {'SIZE':>10}  {'FILES':<12} PATH", file=out)
    print(f"{'upper':<20} {'live':>10}  {live:<12} {stack.upper}", file=out)
    for info in infos:
        print(f"{info.diff_id[:19]:<20} {plans.human_bytes(info.size):>10}  "
              f"{counted(info.files, 'file'):<12} {info.path}", file=out)
    for base in stack.record.base:
        print(f"{'base':<20} {'':>10}  {'':<12} {base}", file=out)


def _resolve_ids(stack: Stack, ids: Sequence[str]) -> list[int]:
    """Positions in the record of the layers named by digests or unique prefixes of them."""
    positions = []
    for given in ids:
        prefix = given.removeprefix(DIGEST_PREFIX).lower()
        found = [i for i, h in enumerate(stack.record.layers) if h.startswith(prefix)]
        if not prefix or len(found) != 1:
            raise CowfsError(f"no layer {given!r} in the stack" if not found or not prefix
                             else f"{given!r} names {len(found)} layers; give more digits")
        positions.append(found[0])
    return positions


def _refuse_changes(stack: Stack, what: str) -> None:
    if _changes(stack):
        raise CowfsError(f"cannot {what}: the upper {str(stack.upper)!r} holds changes made on "
                         "these layers; freeze them first ('cowfs layer freeze') or throw them "
                         f"away ('cowfs reset --yes {stack.upper}')")


def squash(path: Path, ids: Sequence[str], *, out: TextIO | None = None) -> StackLayer:
    """Adjacent frozen layers (all of them without ``ids``) become one with the same view."""
    from .layermerge import merge_layers

    out = out or sys.stderr
    stack = load(path)
    layers = stack.record.layers
    positions = sorted(set(_resolve_ids(stack, ids))) if ids else list(range(len(layers)))
    if len(positions) < 2:
        raise CowfsError("nothing to squash: give two or more adjacent layers (the stack has "
                         f"{counted(len(layers), 'layer')})")
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise CowfsError("the layers to squash must be adjacent in the stack")
    with _upper_held(stack, "squash"):
        _refuse_changes(stack, "squash")
        top, bottom = positions[0], positions[-1]
        below = stack.lowers()[bottom + 1:] or (stack.root / EMPTY_DIR,)
        with _scratch(stack, "squash") as scratch:
            merged = scratch / "merged"
            merge_layers([stack.layer_path(h) for h in layers[top:bottom + 1]], merged)
            rest = StackFile(layers[:top] + layers[bottom + 1:], stack.record.base)
            hex_id = _admit(Stack(stack.root, rest), merged, below, scratch)
            with _uninterrupted():
                _write_record(stack.root, StackFile(
                    (*layers[:top], hex_id, *layers[bottom + 1:]), stack.record.base))
                _renew_upper(stack)
            for h in layers[top:bottom + 1]:
                if h != hex_id:
                    plans.remove_path(stack.layer_path(h))
    print(f"squashed {counted(len(positions), 'layer')} into {DIGEST_PREFIX}{hex_id}", file=out)
    return StackLayer(stack.layer_path(hex_id), DIGEST_PREFIX + hex_id)


def remove(path: Path, given: str, *, out: TextIO | None = None) -> None:
    """Remove the topmost frozen layer: the only one nothing but the (unchanged) upper stacks
    on."""
    out = out or sys.stderr
    stack = load(path)
    (position,) = _resolve_ids(stack, [given])
    hex_id = stack.record.layers[position]
    if position != 0:
        raise CowfsError(f"layer {DIGEST_PREFIX}{hex_id[:12]} has "
                         f"{counted(position, 'layer')} stacked on it; only the topmost layer "
                         f"({DIGEST_PREFIX}{stack.record.layers[0][:12]}) can be removed")
    with _upper_held(stack, "remove a layer"):
        _refuse_changes(stack, "remove the layer under it")
        with _uninterrupted():
            _write_record(stack.root, StackFile(stack.record.layers[1:], stack.record.base))
            _renew_upper(stack)
        plans.remove_path(stack.layer_path(hex_id))
    print(f"removed layer {DIGEST_PREFIX}{hex_id}", file=out)


__all__ = ["Stack", "StackFile", "StackLayer", "freeze", "init", "is_stack", "layer_digest",
           "list_stack", "load", "push_layer", "remove", "squash", "stack_layers",
           "write_layer_tar"]
