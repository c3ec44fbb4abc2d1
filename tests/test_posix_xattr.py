"""Extended attributes on lower-only, upper-only and merged objects, differential against the
kernel's overlayfs: XATTR_CREATE, XATTR_REPLACE, ENODATA, symlinks, listing after copy-up."""

from __future__ import annotations

import os

import pytest
from conformance_support import Pair, each_place, standard_pair_fixture

pytestmark = pytest.mark.kernel

CREATE, REPLACE = os.XATTR_CREATE, os.XATTR_REPLACE
KINDS = pytest.mark.parametrize("kind", ["f", "d", "e"], ids=["file", "dir", "empty-dir"])


pair = pytest.fixture(standard_pair_fixture, name="pair")


def listxattr(pair: Pair, rel: str) -> list[str]:
    names = [
        sorted(os.listxattr(m / rel, follow_symlinks=False)) for m in (pair.kernel, pair.cowfs)
    ]
    assert names[0] == names[1], f"listxattr {rel}: kernel {names[0]}, cowfs {names[1]}"
    return names[1]


@each_place
@KINDS
def test_missing_attribute_is_enodata(pair: Pair, place: str, kind: str) -> None:
    p = f"{place}_{kind}"
    assert pair.run(("getxattr", p, "user.none")) == "ENODATA"
    assert pair.run(("removexattr", p, "user.none")) == "ENODATA"
    assert pair.run(("setxattr", p, "user.none", b"v", REPLACE)) == "ENODATA"
    pair.check()


@each_place
@KINDS
def test_create_and_replace_flags(pair: Pair, place: str, kind: str) -> None:
    p = f"{place}_{kind}"
    assert pair.run(("setxattr", p, "user.new", b"1", CREATE)) == "ok"
    assert pair.run(("setxattr", p, "user.new", b"2", CREATE)) == "EEXIST"
    assert pair.run(("getxattr", p, "user.new")) == b"1"
    assert pair.run(("setxattr", p, "user.new", b"3", REPLACE)) == "ok"
    assert pair.run(("getxattr", p, "user.new")) == b"3"
    assert pair.run(("setxattr", p, "user.new", b"", 0)) == "ok"
    assert pair.run(("getxattr", p, "user.new")) == b""
    assert pair.run(("removexattr", p, "user.new")) == "ok"
    assert pair.run(("getxattr", p, "user.new")) == "ENODATA"
    pair.check_remounted()


@each_place
@KINDS
def test_attributes_from_the_layers_obey_the_flags(pair: Pair, place: str, kind: str) -> None:
    p = f"{place}_{kind}"
    layer = b"upper" if place in ("up", "mg") else b"lower"
    assert listxattr(pair, p) == ["user.layer", f"user.{place}"]
    assert pair.run(("getxattr", p, "user.layer")) == layer
    assert pair.run(("setxattr", p, "user.layer", b"x", CREATE)) == "EEXIST"
    assert pair.run(("setxattr", p, f"user.{place}", b"changed", REPLACE)) == "ok"
    assert pair.run(("removexattr", p, "user.layer")) == "ok"
    assert pair.run(("removexattr", p, "user.layer")) == "ENODATA"
    assert listxattr(pair, p) == [f"user.{place}"]
    pair.check()
    pair.run(("remount",))
    assert listxattr(pair, p) == [f"user.{place}"]
    pair.check("after remount")


@each_place
def test_user_attributes_on_a_symlink_are_refused(pair: Pair, place: str) -> None:
    assert pair.run(("setxattr", f"{place}_l", "user.x", b"1", 0)) == "EPERM"
    assert pair.run(("getxattr", f"{place}_l", "user.x")) == "ENODATA"
    pair.check()


@each_place
def test_names_with_the_overlay_prefix_are_ordinary_user_attributes(pair: Pair, place: str) -> None:
    p = f"{place}_f"
    assert pair.run(("setxattr", p, "user.overlay.opaque", b"y", CREATE)) == "ok"
    assert pair.run(("setxattr", p, "user.overlay.whiteout", b"", CREATE)) == "ok"
    assert pair.run(("getxattr", p, "user.overlay.opaque")) == b"y"
    assert "user.overlay.opaque" in listxattr(pair, p)
    pair.check()
    pair.run(("remount",))
    assert pair.run(("read", p)) != "ENOENT"
    pair.check("after remount")


@each_place
def test_a_large_value_round_trips(pair: Pair, place: str) -> None:
    value = bytes(range(256)) * 8
    assert pair.run(("setxattr", f"{place}_f", "user.big", value, 0)) == "ok"
    assert pair.run(("getxattr", f"{place}_f", "user.big")) == value
    pair.check()


# A version-2 file capability (cap_net_bind_service, permitted + effective), as setcap writes it.
FILE_CAP = bytes.fromhex("0100000200040000000000000000000000000000")


@each_place
def test_file_capabilities_after_writes_as_the_kernel_shows_them(pair: Pair, place: str) -> None:
    """Each write(2) makes the kernel ask for security.capability (cowfs remembers its absence
    per real object); a capability set later must show, and the next write drops it."""
    p = f"{place}_f"
    pair.run(("append", p, b"1"))
    assert pair.run(("getxattr", p, "security.capability")) == "ENODATA"
    pair.run(("append", p, b"2"))
    pair.run(("setxattr", p, "security.capability", FILE_CAP))
    assert pair.run(("getxattr", p, "security.capability")) == FILE_CAP
    pair.run(("append", p, b"3"))  # a write by root still drops file capabilities
    assert pair.run(("getxattr", p, "security.capability")) == "ENODATA"
    pair.check()
