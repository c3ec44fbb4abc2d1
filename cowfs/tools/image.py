"""The OCI image format, as ``cowfs image export`` writes it and ``cowfs image import`` reads it.

An image is a manifest naming a config and layer blobs by their SHA-256 (image-spec
manifest.md); the config's ``rootfs.diff_ids`` are the SHA-256 of each layer's *uncompressed*
tar, bottom layer first (config.md). Two containers hold one:

- an **OCI image layout** (image-layout.md): a directory with ``oci-layout``, ``index.json``
  (pointing at the manifest) and ``blobs/sha256/HEX``;
- a **docker-archive** (what ``docker save``/``podman save`` write and ``docker load``/``podman
  load`` take): a tar with ``manifest.json`` (``[{"Config": NAME, "RepoTags": [...], "Layers":
  [NAME, ...]}]``, bottom first). Docker 25 and later put an OCI layout in the same tar, so that
  one archive is both; Docker before 25 and skopeo name the files ``ID/layer.tar``, ``HEX.tar``
  and ``HEX.json``.

This module is the format only: the media types, digests, and reading an image out of either
container (:func:`read_image`), checking every JSON document's digest and shape as it goes. Blobs
are untrusted input: a digest is refused unless it is ``sha256:`` and 64 lowercase hex digits
before it names a file, and a file is only ever opened below the layout's root, one component at
a time, never through a symlink.

Known limits: one image per layout or archive (an index naming several is refused, but of a
multi-platform index this machine's image is taken); SHA-256 digests only; zstd layers are
refused (Python has no zstd before 3.14), as is any media type not listed here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..core.errors import CowfsError
from . import plans

OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
#: The annotation of index.json naming an image (``oci:DIR:NAME`` in skopeo).
REF_NAME = "org.opencontainers.image.ref.name"

#: Layer media types and the compression each says its blob has ("" none).
LAYER_TYPES = {
    OCI_LAYER: "",
    OCI_LAYER_GZIP: "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)

#: A blob's first bytes, for archives that name no media type (docker-archive).
MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
         b"\x28\xb5\x2f\xfd": "zstd"}

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_BLOB_NAME = re.compile(r"blobs/sha256/([0-9a-f]{64})")


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_name(diff_id: str) -> str:
    """An imported layer's directory name: its diff_id's hex digits, all of them. A prefix (the
    12 digits docker shows) would let a layer made to share it with another (2^48 tries) be
    reused in that layer's place."""
    return diff_id.removeprefix("sha256:")


def canonical_json(value: Any) -> bytes:
    """One byte string per value (sorted keys, no spaces): the same image, the same digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def host_platform() -> tuple[str, str]:
    """``(os, architecture)`` in Go's names, which image configs use."""
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm",
            "i686": "386", "i386": "386"}.get(machine, machine)
    return "linux", arch


def check_digest(value: object, where: str) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) < 100 else type(value).__name__
        raise CowfsError(f"{where}: {shown!r} is not a sha256 digest (only sha256:HEX is "
                         "supported)")
    return value


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A blob as a manifest or index names it (image-spec descriptor.md)."""

    media_type: str
    digest: str
    size: int

    def as_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    @property
    def path(self) -> str:
        return "blobs/sha256/" + self.digest.removeprefix("sha256:")


@dataclass(frozen=True, slots=True)
class LayerBlob:
    """One layer of an image to read: where its blob is, what it must hash to."""

    #: The file in the layout or archive.
    name: str
    #: The blob's digest when the container names one (a manifest's descriptor, a
    #: ``blobs/sha256/HEX`` name), else None.
    digest: str | None
    #: The size the descriptor gives, or None.
    size: int | None
    #: The uncompressed tar's digest, from the config.
    diff_id: str
    #: What the media type says ("", "gzip"), or None when there is none (docker-archive): the
    #: blob's first bytes tell.
    compression: str | None


@dataclass(frozen=True, slots=True)
class Image:
    """An image read from a layout or archive: its layers bottom first."""

    layers: tuple[LayerBlob, ...]
    #: The config's digest (the image ID docker shows).
    config_digest: str


@contextlib.contextmanager
def interruption_reported(what: str, result: str) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the block through its cleanup, then as one line."""
    try:
        with plans.interruptible():
            yield
    except plans.Interrupted as e:
        raise CowfsError(f"{what} interrupted ({e}); {result}", e.exit_code) from None


# --- reading a layout or an archive ---------------------------------------------------------------


class Source:
    """An OCI layout directory or a docker/OCI archive, read by relative file name."""

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read(self, name: str, limit: int = 16 << 20) -> bytes:
        """A small file (a JSON document), whole; refuses one over ``limit`` bytes."""
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CowfsError(f"{self.where(name)}: larger than {limit >> 20} MiB; not an image's "
                             "JSON document")
        return data

    def where(self, name: str) -> str:
        raise NotImplementedError


class DirSource(Source):
    """A layout directory: files reached from its root's descriptor, never through a symlink."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self.root_fd)

    def where(self, name: str) -> str:
        return str(self.root / name)

    def _open_fd(self, name: str) -> int:
        try:
            with plans.parent_of(self.root_fd, name) as (dirfd, base):
                fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        except FileNotFoundError:
            raise CowfsError(f"{self.where(name)}: missing") from None
        except OSError as e:
            raise CowfsError(f"{self.where(name)}: {e.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CowfsError(f"{self.where(name)}: not a regular file")
        return fd

    def open(self, name: str) -> IO[bytes]:
        return os.fdopen(self._open_fd(name), "rb")

    def exists(self, name: str) -> bool:
        try:
            os.close(self._open_fd(name))
        except CowfsError:
            return False
        return True


class TarSource(Source):
    """An archive: its members by name (``./`` and trailing ``/`` dropped); a symlink member (Docker
    before 25 links a layer that two images share) is followed inside the archive only, a hard
    link member reads as its target."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
        except (tarfile.TarError, EOFError, OSError) as e:
            raise CowfsError(f"{path}: not an OCI image layout nor an image archive (not a tar "
                             f"archive: {_last_line(e)})") from None
        try:
            self.members = {_member_name(m.name): m for m in self.tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            self.tar.close()
            raise CowfsError(f"{path}: damaged archive ({_last_line(e)})") from None

    def close(self) -> None:
        self.tar.close()

    def where(self, name: str) -> str:
        return f"{self.path}: {name}" if name else str(self.path)

    def _member(self, name: str) -> tarfile.TarInfo | None:
        for _ in range(8):
            member = self.members.get(name)
            if member is None or not member.issym():
                return member
            target = os.path.normpath(os.path.join(os.path.dirname(name), member.linkname))
            if target.startswith(("/", "../")) or target == "..":
                raise CowfsError(f"{self.where(name)}: a symlink out of the archive")
            name = target
        raise CowfsError(f"{self.where(name)}: too many symlinks")

    def open(self, name: str) -> IO[bytes]:
        member = self._member(name)
        if member is None:
            raise CowfsError(f"{self.where(name)}: missing")
        if not (member.isreg() or member.islnk()):
            raise CowfsError(f"{self.where(name)}: not a regular file")
        try:
            data = self.tar.extractfile(member)  # a hard link: its target's data
        except KeyError:
            data = None
        if data is None:
            raise CowfsError(f"{self.where(name)}: a hard link to nothing in the archive")
        return data

    def exists(self, name: str) -> bool:
        member = self._member(name)
        return member is not None and (member.isreg() or member.islnk())


def _last_line(e: BaseException) -> str:
    """tarfile's "r:*" lists every method it tried, one per line: the last (tar's)."""
    lines = str(e).strip().splitlines()
    return lines[-1].removeprefix("- ") if lines else type(e).__name__


def _member_name(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


@contextlib.contextmanager
def open_source(path: str) -> Iterator[Source]:
    """A layout directory or an archive file; one error line when it is neither."""
    where = Path(path)
    if not where.exists():
        raise CowfsError(f"{path!r} does not exist")
    source: Source = DirSource(where) if where.is_dir() else TarSource(where)
    try:
        yield source
    finally:
        source.close()


def _json(source: Source, name: str, digest: str | None = None,
          size: int | None = None) -> Any:
    data = source.read(name)
    if digest is not None and digest_of(data) != digest:
        raise CowfsError(f"{source.where(name)}: digest mismatch (its content is "
                         f"{digest_of(data)}, not {digest})")
    if size is not None and len(data) != size:
        raise CowfsError(f"{source.where(name)}: {len(data)} bytes, not {size} as its descriptor "
                         "says")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise CowfsError(f"{source.where(name)}: not valid JSON ({e})") from None


def _field(document: Any, key: str, kind: type, where: str) -> Any:
    value = document.get(key) if isinstance(document, dict) else None
    if not isinstance(value, kind):
        raise CowfsError(f"{where}: no {key!r} ({kind.__name__}) in it")
    return value


def descriptor(value: Any, where: str) -> Descriptor:
    media_type = _field(value, "mediaType", str, where)
    digest = check_digest(_field(value, "digest", str, where), where)
    size = _field(value, "size", int, where)
    return Descriptor(media_type, digest, size)


def read_image(source: Source) -> Image:
    """The image in ``source``: from ``manifest.json`` when there is one (what ``docker load``
    reads), else from ``index.json``. The JSON documents are checked against their digests here;
    the layers are checked by the caller as it reads them."""
    if source.exists("manifest.json"):
        return _read_docker_archive(source)
    if source.exists("index.json"):
        return _read_layout(source)
    raise CowfsError(f"{source.where('')}: neither manifest.json nor index.json: not an OCI image "
                     "layout nor a docker save/podman save archive")


def _read_docker_archive(source: Source) -> Image:
    where = source.where("manifest.json")
    entries = _json(source, "manifest.json")
    if not isinstance(entries, list) or not entries:
        raise CowfsError(f"{where}: not a list of images")
    if len(entries) != 1:
        raise CowfsError(f"{where}: holds {len(entries)} images; cowfs imports one (save one "
                         "image per archive)")
    config_name = _field(entries[0], "Config", str, where)
    layer_names = _field(entries[0], "Layers", list, where)
    config_digest = _digest_in_name(config_name, ".json")
    config = _json(source, config_name, config_digest)
    if config_digest is None:
        config_digest = digest_of(source.read(config_name))
    diff_ids = _diff_ids(config, source.where(config_name))
    if len(diff_ids) != len(layer_names):
        raise CowfsError(f"{where}: {len(layer_names)} layers, but the config has "
                         f"{len(diff_ids)} diff_ids")
    layers = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        if not isinstance(name, str):
            raise CowfsError(f"{where}: a layer name is not a string")
        layers.append(LayerBlob(_member_name(name), _digest_in_name(name, ".tar"), None,
                                diff_id, None))
    return Image(tuple(layers), config_digest)


def _digest_in_name(name: str, suffix: str) -> str | None:
    """The digest a file's name says its content has: ``blobs/sha256/HEX``, or ``HEX.json`` for a
    config (skopeo, Docker before 25: the image ID is the config's digest). A layer's ``HEX.tar``
    is not checked here: its HEX is the uncompressed tar's, checked as its diff_id."""
    found = _BLOB_NAME.fullmatch(_member_name(name))
    if found:
        return "sha256:" + found.group(1)
    if suffix == ".json" and re.fullmatch(r"[0-9a-f]{64}\.json", name):
        return "sha256:" + name.removesuffix(".json")
    return None


def _diff_ids(config: Any, where: str) -> list[str]:
    rootfs = _field(config, "rootfs", dict, where)
    if rootfs.get("type") != "layers":
        raise CowfsError(f"{where}: rootfs.type is not 'layers'")
    diff_ids = _field(rootfs, "diff_ids", list, where)
    return [check_digest(d, f"{where}: rootfs.diff_ids") for d in diff_ids]


def _choose_manifest(source: Source, name: str, digest: str | None, size: int | None,
                     depth: int = 0) -> Descriptor:
    """The image manifest an index names: its only entry, or among several (a multi-platform
    index, as ``skopeo copy --all`` writes), the one for this machine's platform; an index in
    the index is followed (once)."""
    where = source.where(name)
    index = _json(source, name, digest, size)
    entries = _field(index, "manifests", list, where)
    described = [descriptor(m, where) for m in entries]
    if len(described) > 1:
        os_name, arch = host_platform()
        described = [d for d, m in zip(described, entries, strict=True)
                     if isinstance(m.get("platform"), dict)
                     and (m["platform"].get("os"), m["platform"].get("architecture"))
                     == (os_name, arch)]
        if len(described) != 1:
            raise CowfsError(f"{where}: names {len(entries)} images, {len(described)} of them "
                             f"for {os_name}/{arch}; cowfs imports one (copy one out first: "
                             "skopeo copy oci:DIR:NAME oci:ONE)")
    if not described:
        raise CowfsError(f"{where}: names no image")
    found = described[0]
    if found.media_type in (OCI_INDEX, DOCKER_LIST):
        if depth > 0:
            raise CowfsError(f"{where}: an index within an index within an index")
        return _choose_manifest(source, found.path, found.digest, found.size, depth + 1)
    if found.media_type not in MANIFEST_TYPES:
        raise CowfsError(f"{where}: unsupported manifest media type {found.media_type!r}")
    return found


def _read_layout(source: Source) -> Image:
    if source.exists("oci-layout"):
        layout = _json(source, "oci-layout")
        version = layout.get("imageLayoutVersion") if isinstance(layout, dict) else None
        if version != OCI_LAYOUT_VERSION:
            raise CowfsError(f"{source.where('oci-layout')}: imageLayoutVersion {version!r} is "
                             f"not {OCI_LAYOUT_VERSION!r}")
    found = _choose_manifest(source, "index.json", None, None)
    manifest = _json(source, found.path, found.digest, found.size)
    where = source.where(found.path)
    config = descriptor(_field(manifest, "config", dict, where), where)
    if config.media_type not in CONFIG_TYPES:
        raise CowfsError(f"{where}: unsupported config media type {config.media_type!r}")
    layers = [descriptor(d, where) for d in _field(manifest, "layers", list, where)]
    diff_ids = _diff_ids(_json(source, config.path, config.digest, config.size),
                         source.where(config.path))
    if len(diff_ids) != len(layers):
        raise CowfsError(f"{where}: {len(layers)} layers, but the config has {len(diff_ids)} "
                         "diff_ids")
    for layer in layers:
        if layer.media_type not in LAYER_TYPES:
            why = " (zstd is not supported)" if "zstd" in layer.media_type else ""
            raise CowfsError(f"{where}: layer {layer.digest}: unsupported media type "
                             f"{layer.media_type!r}{why}")
    return Image(tuple(LayerBlob(d.path, d.digest, d.size, diff_id, LAYER_TYPES[d.media_type])
                       for d, diff_id in zip(layers, diff_ids, strict=True)), config.digest)
