"""The ACL a new object takes from its directory's default ACL (cowfs.daemon.acl), against values
the kernel gives (setfacl notation in the comments)."""

from __future__ import annotations

import pytest

from cowfs.daemon import acl


def value(*entries: tuple[int, int, int]) -> bytes:
    return (2).to_bytes(4, "little") + b"".join(
        t.to_bytes(2, "little") + p.to_bytes(2, "little") + i.to_bytes(4, "little")
        for t, p, i in entries)


ANY = 0xFFFFFFFF
MINIMAL = value((acl.USER_OBJ, 7, ANY), (acl.GROUP_OBJ, 7, ANY), (acl.OTHER, 5, ANY))
NAMED = value((acl.USER_OBJ, 7, ANY), (acl.USER, 6, 1000), (acl.GROUP_OBJ, 5, ANY),
              (acl.MASK, 7, ANY), (acl.OTHER, 0, ANY))


@pytest.mark.parametrize(("default", "mode", "expected"), [
    (MINIMAL, 0o40777, (0o40775, None)),  # d:u::rwx,g::rwx,o::r-x; mkdir 0777: rwxrwxr-x
    (MINIMAL, 0o100666, (0o100664, None)),  # a file: rw-rw-r--
    (MINIMAL, 0o42777, (0o42775, None)),  # S_ISGID kept
    (NAMED, 0o100640, (0o100640, value((acl.USER_OBJ, 6, ANY), (acl.USER, 6, 1000),
                                      (acl.GROUP_OBJ, 5, ANY), (acl.MASK, 4, ANY),
                                      (acl.OTHER, 0, ANY)))),
])
def test_inherit(default: bytes, mode: int, expected: tuple[int, bytes | None]) -> None:
    assert acl.inherit(default, mode) == expected


def test_a_value_that_is_no_acl_is_refused() -> None:
    with pytest.raises(ValueError, match="not a POSIX ACL"):
        acl.inherit(b"\x02\x00\x00", 0o644)
