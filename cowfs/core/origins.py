"""Origins: which lower object an upper object was copied up from, and whether to believe it.

An origin (``user.cowfs.origin``, docs/layer-format.md section 12) gives a copied-up object the
inode number of its lower object, so ``st_ino`` survives copy-up and remounts. But the upper is
untrusted input: anyone who can write a file there can set a ``user.*`` xattr on it. An origin
naming an unrelated lower object would make two objects one (same number, so the inode table
would merge them, and a write to one would land in the other). So an origin is used only once it
is verified against the lower object it names, as the kernel verifies its origin file handles:

1. the object at the same name one layer down (what a copy-up in place leaves) has the recorded
   layer and inode: verified, at the cost of one probe;
2. otherwise (the object was renamed after copy-up; a directory with a redirect always was) the
   recorded path is walked in the recorded layer, never following symlinks, and must lead to an
   object of the same type with the recorded inode; and the merged view must not show at that
   path the lower object itself (after a rename, a whiteout or another object hides it; a lower
   hard link may show there through this very object as its index entry), nor another upper
   object claiming the same origin (the copy that never moved wins). An origin in the old
   two-field form (no path) is verified by rule 1 only, or for a directory by rule 2 with its
   absolute redirect as the path; so is one that records only the digest of a long path
   (``schema.ORIGIN_PATH_INLINE_MAX``), whose redirect must have that digest.

What fails is ignored: the object gets a number of its own. :func:`verify` is the rule alone (no
logging); the mount logs a refused origin once per object, and ``cowfs check`` reports it.

Known limits: a forged origin that names a lower object hidden by the forger's own whiteout (one
that no longer shows anywhere) passes rule 2; it then merely gives the forged object the number of
an object nobody can see. Two upper objects that both pass never share an inode: the inode table
compares the real objects behind one number (:mod:`cowfs.daemon.inodes`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from . import realfs, schema
from .layers import Layer
from .resolve import Found, Real, probe, probe_path, resolve

#: Each layer root's path as the kernel names it, read once (a copy-up asks for every file it
#: copies): read again where a path does not start with it (the layer was moved meanwhile).
_root_names: dict[Layer, str] = {}


def _root_name(layer: Layer, again: bool) -> str:
    name = None if again else _root_names.get(layer)
    if name is None:
        name = os.readlink(realfs.proc_path(layer.root_fd)).rstrip("/")
        _root_names[layer] = name
    return name


def lower_path(real: Real) -> tuple[str, ...] | None:
    """Where a lower object sits below its layer's root (layers never change while mounted, so
    this is its address). None when the kernel cannot name it (it should not happen)."""
    path = os.readlink(realfs.proc_path(real.fd))
    if path.endswith(" (deleted)"):
        return None
    for again in (False, True):
        root = _root_name(real.layer, again)
        if path.startswith(root + "/"):
            return tuple(path[len(root) + 1:].split("/"))
    return None


def read(real: Real) -> schema.Origin | None:
    """The origin an upper object records, or None; ValueError when it is malformed."""
    value = realfs.getxattr(real.fd, schema.origin_xattr(real.mode))
    return None if value is None else schema.parse_origin(value)


def ino_of(real: Real) -> int:
    return real.ino or os.fstat(real.fd).st_ino


def close_reals(reals: Sequence[Real]) -> None:
    for real in reals:
        os.close(real.fd)


def merged_lookup(roots: tuple[Real, ...], components: tuple[str, ...]) -> tuple[Real, ...]:
    """The real objects the merged view shows at a path (empty if none); the caller closes them.

    Same rules as the mount's lookups, from the layer roots (``roots``, upper first), one
    component at a time. The default work directory is not special-cased: origins never name it.
    """
    parents: tuple[Real, ...] = roots
    owned: tuple[Real, ...] = ()
    try:
        for i, part in enumerate(components):
            found = resolve(parents, roots, part)
            close_reals(owned)
            owned = found
            if not found or (i < len(components) - 1 and not found[0].is_dir):
                close_reals(owned)
                owned = ()
                return ()
            parents = found
        result, owned = owned, ()
        return result
    finally:
        close_reals(owned)


def _same_name_matches(origin: schema.Origin, upper: Real, below: Sequence[Real],
                       parents: Sequence[Real], name: str | None) -> bool:
    """Rule 1: the object one layer down at the same name is the origin."""
    for real in below:
        if real.layer.index == origin.layer:
            return ino_of(real) == origin.ino
    if name is None or stat.S_ISDIR(upper.mode):
        return False  # a directory's lower directories are in ``below`` already
    for parent in parents:
        if parent.layer.index != origin.layer:
            continue
        try:
            found = probe(parent, name)
        except OSError:
            return False
        if not isinstance(found, Found):
            return False
        os.close(found.obj.fd)
        return found.obj.ino == origin.ino and stat.S_IFMT(found.obj.mode) == stat.S_IFMT(
            upper.mode)
    return False


def _is_own_index_entry(origin: schema.Origin, upper: Real, index_fd: int | None) -> bool:
    if index_fd is None:
        return False
    entry = realfs.open_path(index_fd, schema.index_name(origin.layer, origin.ino))
    if entry is None:
        return False
    try:
        return _same_inode(entry, upper.fd)
    finally:
        os.close(entry)


def verify(origin: schema.Origin, upper: Real, *, roots: tuple[Real, ...],
           below: Sequence[Real] = (), parents: Sequence[Real] = (), name: str | None = None,
           index_fd: int | None = None) -> str | None:
    """Why ``origin`` (read from ``upper``) must not be used, or None when it is verified.

    ``roots`` are the layer roots by index (upper first); ``below`` the lower real objects the
    lookup found under the same name (a directory's), ``parents`` and ``name`` where the object
    was looked up (to probe the lower object at the same name), ``index_fd`` the hard-link index.
    """
    if not 0 < origin.layer < len(roots):
        return f"origin names layer {origin.layer}, which is not a lower layer of this stack"
    # A redirected directory finds its lower directories at the redirect, not at its name: it
    # was renamed, so it is verified as a renamed object is (by rule 2).
    redirect = upper.redirect if stat.S_ISDIR(upper.mode) else None
    if redirect is None and _same_name_matches(origin, upper, below, parents, name):
        return None
    where = f"layer {origin.layer}"
    components = origin.path
    if components is None and redirect is not None and redirect.absolute and (
            origin.digest is None or origin.names(redirect.components)):
        # An old two-field origin, or one with a long path's digest: where the copy-up was.
        components = redirect.components
    if components is None:
        if origin.digest is not None:
            return (f"no object with inode {origin.ino} at this name in {where}, and its origin "
                    "records only a digest of its path")
        return f"no object with inode {origin.ino} at this name in {where}"
    path = "/" + "/".join(components)
    try:
        found = probe_path(roots[origin.layer], components)
    except OSError as e:
        return f"cannot walk {path} in {where}: {e.strerror}"
    if not isinstance(found, Found):
        return f"{where} has nothing at {path}"
    os.close(found.obj.fd)
    if found.obj.ino != origin.ino or stat.S_IFMT(found.obj.mode) != stat.S_IFMT(upper.mode):
        return f"the object at {path} in {where} is not inode {origin.ino} of the same type"
    try:
        shown = merged_lookup(roots, components)
    except OSError:
        # The merged view cannot be read there (a refused redirect, no permission): the path and
        # the inode matched, and the inode table still never merges two different objects.
        return None
    try:
        return _hidden_at_own_name(origin, upper, shown, path, index_fd)
    finally:
        close_reals(shown)


def _hidden_at_own_name(origin: schema.Origin, upper: Real, shown: tuple[Real, ...], path: str,
                        index_fd: int | None) -> str | None:
    """Rule 2's last part: what the merged view shows at the origin's path must not be the lower
    object itself (unless through this object as its index entry), nor another upper copy of it."""
    if not shown:
        return None
    top = shown[0]
    if not top.layer.is_upper:
        if top.layer.index != origin.layer or ino_of(top) != origin.ino:
            return None
        if top.nlink > 1 and _is_own_index_entry(origin, upper, index_fd):
            return None
        return f"the object it names is still visible at {path}, as itself"
    if _same_inode(top.fd, upper.fd):
        return None
    try:
        other = read(top)
    except ValueError:
        return None
    if other is not None and (other.layer, other.ino) == (origin.layer, origin.ino):
        return f"{path} holds another copy of the object it names"
    return None


def _same_inode(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
