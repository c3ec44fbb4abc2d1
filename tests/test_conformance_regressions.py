"""Regression tests: the minimal failing sequences found by test_conformance_stateful.py (and
the bugs found while writing the POSIX tests), each replayed on the kernel's overlayfs and cowfs
in lockstep, with a remount at the end.

A sequence is the ``lowers = ...`` and step tuples that hypothesis printed, pasted as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conformance_support import HardLink, Step, reference, started_pair
from support import Dir, File

pytestmark = pytest.mark.kernel


def replay(base: Path, lowers: list[dict[str, Any]], steps: list[Step]) -> None:
    with started_pair(base, lowers, **reference()) as pair:
        pair.run_all(steps)
        pair.run(("remount",))
        pair.check("after remount")


def test_unlinking_one_name_of_a_lower_hard_link_set_of_three(tmp_path: Path) -> None:
    """Kernel (index=on): the two names left report st_nlink 2. cowfs reported 1."""
    replay(tmp_path, [{"d": File(), "b": HardLink("d"), "e": HardLink("d")}], [("unlink", "d")])


def test_unlinking_one_name_of_a_lower_hard_link_set_with_a_hidden_name(tmp_path: Path) -> None:
    """The set a, b, c of the lower layer, c hidden by the layer above: after unlinking a, the
    kernel (index=on) reports st_nlink 2 for b (3 - 1); cowfs reported 1."""
    lowers = [{"c": File()}, {"a": File(), "b": HardLink("a"), "c": HardLink("a")}]
    replay(tmp_path, lowers, [("pwrite", "a", 0, b"X"), ("unlink", "a")])


@pytest.mark.parametrize("first", [("unlink", "d"), ("rename", "b", "d")], ids=["unlink", "rename"])
def test_an_open_lower_hard_link_whose_names_are_all_unlinked_has_no_links(
    tmp_path: Path, first: Step
) -> None:
    """Found by the state machine (shrunk by hand): the set d, c of the lower layer; d goes (an
    unlink, or a rename over it), c is opened and unlinked: fstat says st_nlink 0 on the kernel.
    cowfs said 1 before the nlink fix of lower hard-link sets."""
    lowers = [{"d": File(b"d"), "c": HardLink("d"), "b": File(b"b")}]
    replay(tmp_path, lowers, [first, ("hold", "c", "r"), ("unlink", "c"), ("fd_stat", 0)])


@pytest.mark.parametrize("gid", [0, 1000])
def test_mkdir_over_a_whiteout_in_a_set_group_id_directory_inherits_the_bit(
    tmp_path: Path, gid: int
) -> None:
    """Found by the state machine (shrunk): a new directory in a set-group-ID directory takes its
    group and the set-group-ID bit; over a whiteout (the name existed in a lower layer) cowfs gave
    it the group but not the bit. Files there are fine; so are directories over empty names."""
    lowers = [{"d": Dir(mode=0o2775, gid=gid), "d/x": File()}]
    replay(tmp_path, lowers, [("unlink", "d/x"), ("mkdir", "d/x", 0o755), ("stat", "d/x")])


#: A minimal POSIX access ACL (user::rwx, group::---, other::---): what cp -a and setfacl write to
#: set a mode; on a filesystem without ACLs stored, it changes the mode bits only.
ACL_0700 = bytes.fromhex(
    "02000000010007 00ffffffff04000000ffffffff20000000ffffffff".replace(" ", "")
)


@pytest.mark.parametrize("rel", ["d", "f", "new"])
def test_setting_a_mode_through_an_access_acl_shows_at_once(tmp_path: Path, rel: str) -> None:
    """cp -a sets modes this way. (cp -a onto a lower directory still showed the old mode in
    test_tools_real's cp -a test; this shorter sequence does not show that bug.)"""
    lowers = [{"d": Dir(mode=0o755), "f": File(mode=0o644)}]
    replay(
        tmp_path,
        lowers,
        [
            ("mkdir", "new", 0o755),
            ("stat", rel),
            ("setxattr", rel, "system.posix_acl_access", ACL_0700, 0),
            ("stat", rel),
        ],
    )


def test_set_id_bits_after_a_users_change_and_directory_seeks(tmp_path: Path) -> None:
    """Issue 22: a write or fallocate by a user outside the file's group drops S_ISGID also
    without group execute (cowfs kept it); a seekdir to an offset no entry had read the end of
    the directory (cowfs's offsets named a snapshot)."""
    lowers = [{
        "f": File(b"x" * 5000, mode=0o6766, uid=1000, gid=0),
        "g": File(b"x" * 5000, mode=0o6766, uid=1000, gid=1000),
        "h": File(b"x" * 5000, mode=0o6776, uid=1000, gid=1000),
        "d": Dir(), "d/a": File(), "d/b": File(), "d/c": File(), "d/e": File(),
    }]
    steps: list[Step] = [
        ("as", 1000, 1000, ("pwrite", "f", 0, b"y")),
        ("as", 1000, 1000, ("fallocate", "g", 0, 0, 4096)),
        ("as", 1000, 1000, ("fallocate", "h", 0x10, 0, 4096)),
        ("unlink", "d/b"),
        ("seekdir", "d"),
        ("seekdir", "."),
    ]
    with started_pair(tmp_path, lowers, cowfs_options=("allow_other",), public=True,
                      **reference()) as pair:
        pair.run_all(steps)
        assert [pair.run(("stat", rel))[0] for rel in "fgh"] == [
            "-rwxrw-rw-", "-rwxrwSrw-", "-rwxrwxrw-"]
        pair.run(("remount",))
        pair.check("after remount")
