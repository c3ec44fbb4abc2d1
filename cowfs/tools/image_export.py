"""``cowfs image export``: a stack of layers as one OCI image, for podman, docker and skopeo.

Each layer becomes one OCI layer in the canonical form of :mod:`cowfs.tools.layertar`, the one
whose sha256 names a frozen layer in its stack: a frozen layer written from its directory, any
other (a live ``--upper``, a plain directory) as ``cowfs export`` of it against the layers below
it (:func:`cowfs.tools.oci.export_layer`: whiteouts, opaque markers, renamed directories written
whole, hard links, xattrs) rewritten in that form (:func:`~cowfs.tools.layertar.write_canonical`).
So the same stack gives the same bytes and the same digests every time, an upper exported live
and the same upper frozen give the same diff_id, and a stack imported back and exported again
gives the same diff_ids. Besides the layers:

- gzip without a file name or time in its header (:func:`cowfs.tools.oci.gzip_writer`);
- JSON with sorted keys and no spaces; the config has no creation time but the epoch, and its
  history names no path.

A lower layer is exported as a lower of the stack is seen by a mount: without the hard-link
index of a work directory it may hold (the index serves only the mount whose work directory it
is, layer-format.md section 12). The ``--upper`` on top is exported with its own work directory,
as ``cowfs export`` does.

The output is built beside OUT under a temporary name and renamed into place when complete;
a failed or interrupted export leaves nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TextIO, cast

from ..core.errors import CowfsError
from ..core.layers import parse_lowers
from ..core.mounts import layers_for
from ..core.wording import counted
from . import oci, outputs, plans
from . import stack as _stack
from .changes import visible_changes
from .image import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYOUT_VERSION,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    canonical_json,
    host_platform,
    interruption_reported,
)
from .layertar import write_canonical, write_layer_tar
from .walk import walk

FORMATS = ("oci", "docker-archive")
#: The config's creation time: fixed, so that the same layers give the same image.
EPOCH = "1970-01-01T00:00:00Z"
CREATED_BY = "cowfs image export"


@dataclass(frozen=True, slots=True)
class LayerSource:
    """One layer to export: the directory, the layers below it (topmost first), and the work
    directory whose index serves some of its names (an empty one for a lower layer)."""

    path: Path
    below: tuple[Path, ...]
    work: Path | None

    @property
    def frozen(self) -> bool:
        """A frozen layer of a stack (``cowfs layer freeze``): written as its canonical tar,
        whose sha256 is the diff_id that names it in the stack."""
        return _stack.frozen_layer(str(self.path))


@dataclass(frozen=True, slots=True)
class Exported:
    """What an export wrote: the layers bottom first, and the manifest's digest."""

    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    manifest: Descriptor


def output_format(to: str, given: str | None) -> str:
    """``--format``, else docker-archive for a ``.tar`` OUT and an OCI layout otherwise."""
    if given is not None:
        return given
    return "docker-archive" if to.endswith(".tar") else "oci"


def stack_layers(stack: str | None, upper: str | None, *,
                 err: TextIO | None = None) -> list[LayerSource]:
    """The layers to export, bottom first. ``stack`` may be a layer stack (``cowfs layer
    init``): its frozen layers and base, without its live upper, as ``docker commit`` comes
    before ``docker save``."""
    if stack is not None and upper is None and _stack.is_stack(stack):
        found = _stack.load(stack)
        if found.record.layers or found.record.base:
            if _live_changes(found):
                print(f"cowfs image export: the changes in {str(found.upper)!r} are not "
                      f"exported; freeze them first ('cowfs layer freeze {found.root}')",
                      file=err or sys.stderr)
            stack = found.lowers_spec()
        else:
            raise CowfsError(f"stack {str(found.root)!r} has no layers yet: freeze its "
                             f"changes first ('cowfs layer freeze {found.root}')")
    if upper is not None:
        layers = layers_for(upper, stack)
        lowers = layers.lowers
        top = [LayerSource(layers.upper, tuple(lowers), layers.work)]
    elif stack is not None:
        lowers = parse_lowers(stack)
        top = []
    else:
        raise CowfsError("give the stack to export (LOWER[:LOWER...], topmost first), or "
                         "--upper UPPER")
    for path in lowers:
        if not path.is_dir():
            raise CowfsError(f"layer {str(path)!r} " + (
                "is not a directory" if path.exists() else "does not exist"))
    below = [LayerSource(path, tuple(lowers[i + 1:]), None) for i, path in enumerate(lowers)]
    return (top + below)[::-1]


def _live_changes(found: _stack.Stack) -> list[object]:
    return list(visible_changes(walk(found.upper, found.lowers())))


def export_image(layers: Sequence[LayerSource], to: str, *, fmt: str, tag: str | None = None,
                 out: TextIO | None = None) -> Exported:
    target = Path(to)
    if fmt == "oci":
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise CowfsError(f"{to!r} exists and is not an empty directory")
    elif target.is_dir():
        raise CowfsError(f"{to!r} is a directory; give the name of the archive to write, e.g. "
                         f"--to {os.path.join(to, 'image.tar')}")
    made = outputs.make_dirs(target.parent)
    try:
        plans.remove_stale_temporaries(target.parent, target.name, "image-export")
        temp = target.parent / plans.temporary_name(target.name, "image-export")
        try:
            with interruption_reported("image export", f"{to!r} was not written"):
                exported = _export(layers, temp, target, fmt, tag)
        finally:
            plans.remove_path(temp)
    except BaseException:
        outputs.remove_dirs(made)
        raise
    print(f"exported {counted(len(exported.layers), 'layer')} to {to} ({fmt}): manifest "
          f"{exported.manifest.digest}", file=out or sys.stderr)
    return exported


def _export(layers: Sequence[LayerSource], temp: Path, target: Path, fmt: str,
            tag: str | None) -> Exported:
    """Build the layout in ``temp/layout`` (the layers exported in ``temp/scratch`` first),
    then rename it, or the archive of it, to ``target``."""
    layout, scratch = temp / "layout", temp / "scratch"
    blobs = layout / "blobs/sha256"
    for directory in (temp, layout, layout / "blobs", blobs, scratch):
        directory.mkdir(mode=0o755)
    no_index = scratch / "no-index"  # an empty work directory: a lower's index serves no one
    no_index.mkdir()
    descriptors, diff_ids = [], []
    for number, layer in enumerate(layers, start=1):
        if layer.frozen:
            desc, diff_id = _store_frozen(layer.path, blobs, compress=fmt == "oci")
            descriptors.append(desc)
            diff_ids.append(diff_id)
            continue
        raw = scratch / "layer.tar"
        try:
            oci.export_layer(layer.path, layer.below, str(raw), out=io.StringIO(),
                             work=layer.work if layer.work is not None else no_index)
        except CowfsError as e:
            if e.exit_code > 128:  # the layer's own export/import was interrupted: ours is
                raise plans.Interrupted(e.exit_code - 128) from None
            raise CowfsError(f"layer {number} from the bottom ({layer.path}): {e}",
                             e.exit_code) from None
        with raw.open("rb") as source:
            desc, diff_id = _store_layer(source, blobs, compress=fmt == "oci")
        raw.unlink()
        descriptors.append(desc)
        diff_ids.append(diff_id)
    config = _store(blobs, canonical_json(_config(diff_ids)), OCI_CONFIG)
    manifest = _store(blobs, canonical_json({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config.as_json(),
        "layers": [d.as_json() for d in descriptors]}), OCI_MANIFEST)
    entry = manifest.as_json()
    if tag is not None:
        entry["annotations"] = {REF_NAME: tag}
    (layout / "index.json").write_bytes(canonical_json({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}))
    (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion":
                                                        OCI_LAYOUT_VERSION}))
    if fmt == "docker-archive":
        # As Docker 25's docker save: an OCI layout and manifest.json in one tar.
        (layout / "manifest.json").write_bytes(canonical_json([{
            "Config": config.path, "RepoTags": [tag] if tag else [],
            "Layers": [d.path for d in descriptors]}]))
        archive = temp / "image.tar"
        _write_archive(layout, archive)
        os.replace(archive, target)
    else:
        if target.exists():
            target.rmdir()  # an empty directory, checked before
        os.rename(layout, target)
    return Exported(tuple(descriptors), tuple(diff_ids), manifest)


def _config(diff_ids: Sequence[str]) -> dict[str, object]:
    os_name, arch = host_platform()
    return {"architecture": arch, "os": os_name, "created": EPOCH, "config": {},
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [{"created": EPOCH, "created_by": CREATED_BY} for _ in diff_ids]}


def _store(blobs: Path, data: bytes, media_type: str) -> Descriptor:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    return Descriptor(media_type, digest, len(data))


class _Hashing:
    """A file object that hashes and counts what goes through it on the way to ``dest``."""

    def __init__(self, dest: IO[bytes] | gzip.GzipFile | None) -> None:
        self.dest = dest
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self.dest is not None:
            self.dest.write(data)
        return len(data)

    def flush(self) -> None:
        if self.dest is not None:
            self.dest.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _store_layer(source: IO[bytes], blobs: Path, *, compress: bool) -> tuple[Descriptor, str]:
    """The canonical form (:func:`~cowfs.tools.layertar.write_canonical`) of the layer tar
    ``source`` as a blob; its descriptor and diff_id."""
    return _store_tar(blobs, compress,
                      lambda out: write_canonical(source, cast(IO[bytes], out)))


def _store_frozen(layer: Path, blobs: Path, *, compress: bool) -> tuple[Descriptor, str]:
    """A frozen layer's canonical tar (:func:`~cowfs.tools.layertar.write_layer_tar`) as a blob;
    its descriptor and diff_id: the one its name in the stack says, unless the layer was changed
    by hand or ``SOURCE_DATE_EPOCH`` now clamps times it did not clamp at the freeze."""
    return _store_tar(blobs, compress,
                      lambda out: write_layer_tar(layer, cast(IO[bytes], out)))


def _store_tar(blobs: Path, compress: bool,
               write: Callable[[_Hashing], None]) -> tuple[Descriptor, str]:
    """The layer tar ``write`` writes, stored as a blob (gzip-compressed with ``compress``);
    its descriptor and diff_id (the uncompressed tar's digest)."""
    temp = blobs / ".layer.partial"
    with temp.open("wb") as blob:
        stored = _Hashing(blob)
        if compress:
            with oci.gzip_writer(cast(IO[bytes], stored)) as packed:
                uncompressed = _Hashing(packed)
                write(uncompressed)
        else:
            uncompressed = stored
            write(uncompressed)
    final = blobs / stored.digest.removeprefix("sha256:")
    os.replace(temp, final)  # the same layer twice in a stack: the same blob
    final.chmod(0o644)
    return (Descriptor(OCI_LAYER_GZIP if compress else OCI_LAYER, stored.digest, stored.size),
            uncompressed.digest)


def _write_archive(layout: Path, archive: Path) -> None:
    """The layout as a tar: names sorted, owner root, time 0, modes 0755 and 0644."""
    paths = sorted((p.relative_to(layout).as_posix() for p in layout.rglob("*")),
                   key=lambda p: p.split("/"))
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in paths:
            path = layout / rel
            info = tarfile.TarInfo(rel)
            info.mtime = 0
            if stat.S_ISDIR(path.lstat().st_mode):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.mode, info.size = 0o644, path.stat().st_size
                with path.open("rb") as data:
                    tar.addfile(info, data)
