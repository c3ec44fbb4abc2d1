"""``cowfs image import``: an OCI image (a layout, or a ``docker save``/``podman save`` archive)
into a stack of cowfs layers.

Every layer goes to ``DIR/HEX``, HEX being the hex digits of its diff_id, so that
``DIR`` is a store of layers named by content: a second image that shares layers with the first
reuses them (an existing ``DIR/SHORT`` is taken as it is: an import puts a layer there only
complete). The stack is printed, topmost first, as ``cowfs mount`` and ``cowfs run`` take it.

What is checked, before a layer is used: each JSON document against the digest that names it
(:func:`cowfs.tools.image.read_image`); each layer blob against its digest and size, and its
uncompressed tar against the config's diff_id, while it is copied out of the image into a
scratch directory in DIR (so that what is imported is what was checked, also from a layout that
someone changes meanwhile); its members by :func:`cowfs.tools.oci.import_layer`, which refuses
unsafe ones. Any failure is one line naming the file or layer, and leaves nothing: the layers
this import made are removed, and so are DIR and its parents when it made them.

Known limits: a layer given twice in one image is stacked once, at its topmost place (the lower
copy cannot change the view: everything it shows or hides, the upper one does too).
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import re
import sys
import zlib
from pathlib import Path
from typing import IO, TextIO, cast

from ..core.errors import CowfsError
from ..core.wording import counted
from . import oci, outputs, plans
from .image import (
    MAGIC,
    LayerBlob,
    Source,
    interruption_reported,
    layer_name,
    open_source,
    read_image,
)

CHUNK = 1 << 20


def import_image(path: str, into: Path, *, out: TextIO | None = None,
                 err: TextIO | None = None) -> list[Path]:
    """Import the image at ``path`` into layers under ``into``; returns the stack, topmost
    first, and prints it (``:``-separated) on ``out``."""
    if into.exists() and not into.is_dir():
        raise CowfsError(f"{str(into)!r} exists and is not a directory")
    with open_source(path) as source:
        image = read_image(source)
        made = outputs.make_dirs(into)
        created: list[Path] = []
        try:
            _remove_stale_temporaries(into)
            scratch = into / plans.temporary_name("image", "import")
            try:
                with interruption_reported("image import", "no layer was left behind"):
                    stack, reused = _import(source, image.layers, into, scratch, created)
            finally:
                plans.remove_path(scratch)
        except BaseException:
            for layer in created:
                plans.remove_path(layer)
            outputs.remove_dirs(made)
            raise
    lowers = ":".join(os.path.abspath(p) for p in stack)  # for use from any directory
    print(f"imported {counted(len(image.layers), 'layer')} into {into}"
          + (f" ({reused} already there)" if reused else ""), file=err or sys.stderr)
    print(lowers, file=out or sys.stdout)
    return stack


def _remove_stale_temporaries(into: Path) -> None:
    """What killed imports left in DIR: their scratch directory, and the layer each was making
    (:func:`cowfs.tools.oci.import_layer` removes only its own destination's)."""
    with contextlib.suppress(OSError):
        for entry in into.iterdir():
            found = re.fullmatch(r"\.(.+)\.cowfs-import-\d+", entry.name)
            if found:
                plans.remove_stale_temporaries(into, found.group(1), "import")


def _import(source: Source, layers: tuple[LayerBlob, ...], into: Path, scratch: Path,
            created: list[Path]) -> tuple[list[Path], int]:
    scratch.mkdir(mode=0o700)
    stack: list[Path] = []
    reused = 0
    for number, layer in enumerate(layers, start=1):
        dest = into / layer_name(layer.diff_id)
        blob = scratch / "layer"
        try:
            _copy_checked(source, layer, blob)
            if dest in stack:
                pass  # the same layer again in this image
            elif os.path.lexists(dest):
                if dest.is_symlink() or not dest.is_dir():
                    raise CowfsError(f"{str(dest)!r} exists and is not a layer directory")
                reused += 1
            else:
                oci.import_layer(str(blob), dest, out=io.StringIO())
                created.append(dest)
        except CowfsError as e:
            if e.exit_code > 128:  # the layer's own export/import was interrupted: ours is
                raise plans.Interrupted(e.exit_code - 128) from None
            raise CowfsError(f"layer {number} from the bottom ({layer.diff_id}): {e}",
                             e.exit_code) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                blob.unlink()
        if dest in stack:
            stack.remove(dest)  # the topmost place counts (see the module's known limits)
        stack.append(dest)
    return stack[::-1], reused


def _copy_checked(source: Source, layer: LayerBlob, dest: Path) -> None:
    """Copy the blob to ``dest``, checking its digest and size, then its uncompressed tar's
    digest against the diff_id."""
    digest = hashlib.sha256()
    size = 0
    with source.open(layer.name) as blob, dest.open("wb") as copy:
        while chunk := blob.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            copy.write(chunk)
    if layer.digest is not None and "sha256:" + digest.hexdigest() != layer.digest:
        raise CowfsError(f"{source.where(layer.name)}: digest mismatch (its content is "
                         f"sha256:{digest.hexdigest()}, not {layer.digest})")
    if layer.size is not None and size != layer.size:
        raise CowfsError(f"{source.where(layer.name)}: {size} bytes, not {layer.size} as the "
                         "manifest says")
    with dest.open("rb") as copy:
        found = _compression_of(copy.read(6))
    where = source.where(layer.name)
    if layer.compression == "gzip" and found != "gzip":
        raise CowfsError(f"{where}: not gzip-compressed, but its media type says so")
    if layer.compression == "" and found:
        raise CowfsError(f"{where}: {found}-compressed, but its media type says an uncompressed "
                         "tar")
    if found == "zstd":
        raise CowfsError(f"{where}: a zstd-compressed layer; zstd is not supported")
    diff_id = _uncompressed_digest(dest, found, where)
    if diff_id != layer.diff_id:
        raise CowfsError(f"{where}: the uncompressed layer's digest is "
                         f"{diff_id}, not the config's diff_id {layer.diff_id}")


def _compression_of(head: bytes) -> str:
    return next((name for magic, name in MAGIC.items() if head.startswith(magic)), "")


def _open_uncompressed(path: Path, compression: str) -> IO[bytes]:
    if compression == "gzip":
        return cast(IO[bytes], gzip.GzipFile(path, "rb"))
    if compression == "bzip2":
        return cast(IO[bytes], bz2.BZ2File(path, "rb"))
    if compression == "xz":
        return cast(IO[bytes], lzma.LZMAFile(path, "rb"))
    return path.open("rb")


def _uncompressed_digest(path: Path, compression: str, where: str) -> str:
    digest = hashlib.sha256()
    try:
        with _open_uncompressed(path, compression) as data:
            while chunk := data.read(CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise CowfsError(f"{where}: damaged {compression} data ({e})") from None
    return "sha256:" + digest.hexdigest()
