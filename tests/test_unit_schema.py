"""The layer format's pure rules: xattr escaping, whiteout and opaque recognition."""

import stat

import pytest

from cowfs.core import schema


@pytest.mark.parametrize(
    ("user_name", "stored"),
    [
        ("user.foo", "user.foo"),
        ("user.overlay.foo", "user.overlay.overlay.foo"),
        ("user.overlay.overlay.foo", "user.overlay.overlay.overlay.foo"),
        ("trusted.overlay.opaque", "trusted.overlay.overlay.opaque"),
        ("security.selinux", "security.selinux"),
        ("user.overlayfoo", "user.overlayfoo"),
    ],
)
def test_escape_round_trips(user_name: str, stored: str) -> None:
    assert schema.escape_xattr(user_name) == stored
    assert schema.unescape_xattr(stored) == user_name


@pytest.mark.parametrize(
    "stored",
    ["user.overlay.opaque", "user.overlay.whiteout", "trusted.overlay.redirect",
     "trusted.cowfs.origin",
     "user.cowfs.format", "user.cowfs.anything"],
)
def test_layer_metadata_is_hidden_and_not_copied(stored: str) -> None:
    assert schema.unescape_xattr(stored) is None
    assert not schema.is_copied_on_copy_up(stored)


def test_users_xattrs_are_copied_up() -> None:
    assert schema.is_copied_on_copy_up("user.overlay.overlay.x")
    assert schema.is_copied_on_copy_up("security.capability")
    assert schema.is_copied_on_copy_up("user.mime_type")


def test_reserved_namespace() -> None:
    assert schema.is_reserved_xattr("user.cowfs.format")
    assert not schema.is_reserved_xattr("user.overlay.foo")


@pytest.mark.parametrize(
    ("value", "mark"),
    [(b"y", schema.DirMark.OPAQUE), (b"x", schema.DirMark.XWHITEOUTS), (None, schema.DirMark.PLAIN),
     (b"n", schema.DirMark.PLAIN), (b"", schema.DirMark.PLAIN)],
)
def test_dir_mark(value: bytes | None, mark: schema.DirMark) -> None:
    assert schema.dir_mark(value) is mark


def test_device_whiteout_is_char_device_zero_zero() -> None:
    assert schema.is_device_whiteout(stat.S_IFCHR, 0)
    assert not schema.is_device_whiteout(stat.S_IFCHR, 0x0103)  # /dev/null
    assert not schema.is_device_whiteout(stat.S_IFREG, 0)


def test_only_empty_regular_files_can_be_xattr_whiteouts() -> None:
    assert schema.may_be_xattr_whiteout(stat.S_IFREG | 0o644, 0)
    assert not schema.may_be_xattr_whiteout(stat.S_IFREG | 0o644, 1)
    assert not schema.may_be_xattr_whiteout(stat.S_IFDIR | 0o755, 0)


def test_reading_honours_both_spellings_user_first() -> None:
    assert schema.overlay_xattr_names("opaque") == ("user.overlay.opaque", "trusted.overlay.opaque")


@pytest.mark.parametrize(
    ("value", "origin"),
    [
        (b"1:42", schema.Origin(1, 42)),
        (b"2:42:/a/b", schema.Origin(2, 42, ("a", "b"))),
        (b"1:18446744073709551615:/x:y", schema.Origin(1, (1 << 64) - 1, ("x:y",))),
    ],
)
def test_origins_parse_and_round_trip(value: bytes, origin: schema.Origin) -> None:
    assert schema.parse_origin(value) == origin
    assert schema.format_origin(origin.layer, origin.ino, origin.path) == value


@pytest.mark.parametrize(
    "value",
    [b"", b"1", b"1:", b":5", b"0:5", b"1:-5", b"1:+5", b"1: 5", b"1:5 ", b"1:1_0", b"x:5",
     b"1:\xd9\xa3", b"1:18446744073709551616", b"501:5", b"1:" + b"9" * 40, b"1:5:",
     b"1:5:a", b"1:5:/", b"1:5:/a//b", b"1:5:/a/../b", b"1:5:/a/\0", b"1:5:/" + b"a" * 5000],
)
def test_bad_origins_are_refused(value: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011  (the message is for logs and check)
        schema.parse_origin(value)


def test_a_long_origin_path_is_recorded_by_its_digest() -> None:
    """Past 1024 bytes the origin holds the path's SHA-256 (layer-format.md section 12), which
    names the path it was made of and no other; a path up to 1024 bytes is recorded as it is."""
    long_path = tuple("d" * 255 for _ in range(5))
    value = schema.format_origin(3, 77, long_path)
    assert len(value) < 100
    assert value.startswith(b"3:77:sha256:")
    origin = schema.parse_origin(value)
    assert (origin.layer, origin.ino, origin.path) == (3, 77, None)
    assert origin.names(long_path)
    assert not origin.names((*long_path[:-1], "e" * 255))
    short = ("a" * 1023,)  # "/" and 1023 bytes: 1024, the longest kept as a path
    assert schema.parse_origin(schema.format_origin(1, 5, short)).path == short
    assert not schema.origin_path_inline(("a" * 1024,))


@pytest.mark.parametrize("digest", [b"", b"0" * 63, b"0" * 65, b"A" * 64, b"g" * 64,
                                    b"0" * 63 + b"\n"])
def test_bad_origin_digests_are_refused(digest: bytes) -> None:
    with pytest.raises(ValueError, match="digest"):
        schema.parse_origin(b"1:5:sha256:" + digest)


def test_counts_are_range_checked() -> None:
    assert schema.parse_number(b"0", schema.MAX_COUNT) == 0
    assert schema.parse_number(b"4294967295", schema.MAX_COUNT) == (1 << 32) - 1
    for bad in (b"4294967296", b"18446744073709551616", b"-1", b"", b"1.0", b"\xd9\xa3", b" 1"):
        assert schema.parse_number(bad, schema.MAX_COUNT) is None
