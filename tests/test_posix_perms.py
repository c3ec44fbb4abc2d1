"""Permission checks for a user other than root on lower-only, upper-only and merged objects,
differential against the kernel's overlayfs: each step runs in a forked child that has become
uid 1000 (gid 1000, no supplementary groups). EACCES and EPERM, sticky and set-group-ID
directories, who may change modes, owners and times."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conformance_support import PLACES, Pair, Step, each_place, reference, started_pair
from support import Dir, File

pytestmark = pytest.mark.kernel

USER, GROUP, OTHER_GROUP = 1000, 1000, 2000


def _objects(place: str) -> dict[str, Any]:
    p = place
    return {
        f"{p}_secret": File(mode=0o600),
        f"{p}_ro": File(mode=0o644),
        f"{p}_shared": File(mode=0o666),
        f"{p}_mine": File(uid=USER, gid=GROUP, mode=0o644),
        f"{p}_rodir": Dir(mode=0o755),
        f"{p}_rodir/x": File(mode=0o666),
        f"{p}_sticky": Dir(mode=0o1777),
        f"{p}_sticky/root": File(mode=0o666),
        f"{p}_sticky/user": File(uid=USER, gid=GROUP, mode=0o644),
        f"{p}_sgid": Dir(mode=0o2777, gid=OTHER_GROUP),
        f"{p}_mydir": Dir(uid=USER, gid=GROUP, mode=0o755),
    }


LOWER = {k: v for p in ("lo", "mg") for k, v in _objects(p).items()}
UPPER = {k: v for p in ("up", "mg") for k, v in _objects(p).items()}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with started_pair(
        tmp_path,
        [LOWER],
        upper=UPPER,
        cowfs_options=("allow_other",),
        public=True,
        **reference(),
    ) as p:
        yield p


def as_user(pair: Pair, step: Step) -> Any:
    return pair.run_as(USER, GROUP, step)


@each_place
def test_reading_and_writing_other_users_files(pair: Pair, place: str) -> None:
    p = place
    assert as_user(pair, ("read", f"{p}_secret")) == "EACCES"
    assert as_user(pair, ("read", f"{p}_ro")) == pair.run(("read", f"{p}_ro"))
    assert as_user(pair, ("pwrite", f"{p}_ro", 0, b"x")) == "EACCES"
    assert as_user(pair, ("truncate", f"{p}_ro", 0)) == "EACCES"
    assert as_user(pair, ("open", f"{p}_ro", "wt")) == "EACCES"
    assert as_user(pair, ("pwrite", f"{p}_shared", 0, b"user was here")) == "ok"
    assert as_user(pair, ("append", f"{p}_mine", b"+mine")) == "ok"
    pair.check_remounted()


@each_place
def test_a_directory_the_user_cannot_write(pair: Pair, place: str) -> None:
    d = f"{place}_rodir"
    for step in [
        ("open", f"{d}/new", "cx"),
        ("mkdir", f"{d}/new"),
        ("unlink", f"{d}/x"),
        ("rename", f"{d}/x", f"{d}/y"),
        ("rename", f"{d}/x", f"{place}_sticky/moved"),
        ("symlink", "t", f"{d}/l"),
        ("link", f"{place}_mine", f"{d}/l"),
    ]:
        assert as_user(pair, step) == "EACCES", step
    assert as_user(pair, ("pwrite", f"{d}/x", 0, b"file is writable")) == "ok"
    pair.check()


@each_place
def test_a_sticky_directory(pair: Pair, place: str) -> None:
    d = f"{place}_sticky"
    assert as_user(pair, ("unlink", f"{d}/root")) == "EPERM"
    assert as_user(pair, ("rename", f"{d}/root", f"{d}/stolen")) == "EPERM"
    assert as_user(pair, ("pwrite", f"{d}/root", 0, b"but writable")) == "ok"
    assert as_user(pair, ("open", f"{d}/new", "cx")) == "ok"
    assert as_user(pair, ("rename", f"{d}/user", f"{d}/renamed")) == "ok"
    assert as_user(pair, ("unlink", f"{d}/renamed")) == "ok"
    assert pair.run(("stat", f"{d}/new"))[1:3] == (USER, GROUP)
    pair.check_remounted()


@each_place
def test_a_set_group_id_directory(pair: Pair, place: str) -> None:
    d = f"{place}_sgid"
    assert as_user(pair, ("open", f"{d}/f", "cx", 0o664)) == "ok"
    assert as_user(pair, ("mkdir", f"{d}/sub", 0o775)) == "ok"
    assert as_user(pair, ("open", f"{d}/sub/g", "cx", 0o664)) == "ok"
    assert pair.run(("stat", f"{d}/f"))[:3] == ("-rw-r--r--", USER, OTHER_GROUP)  # umask 022
    assert pair.run(("stat", f"{d}/sub"))[:3] == ("drwxr-sr-x", USER, OTHER_GROUP)
    assert pair.run(("stat", f"{d}/sub/g"))[2] == OTHER_GROUP
    pair.check_remounted()


@each_place
def test_who_may_change_modes_and_owners(pair: Pair, place: str) -> None:
    p = place
    assert as_user(pair, ("chmod", f"{p}_shared", 0o600)) == "EPERM"
    assert as_user(pair, ("chown", f"{p}_mine", 0, 0)) == "EPERM"
    assert as_user(pair, ("chown", f"{p}_mine", USER, OTHER_GROUP)) == "EPERM"
    assert as_user(pair, ("chmod", f"{p}_mine", 0o640)) == "ok"
    # Not a member of the file's group: the kernel drops the set-group-ID bit.
    assert as_user(pair, ("chown", f"{p}_mydir", USER, GROUP)) == "ok"
    assert pair.run(("chown", f"{p}_mine", USER, OTHER_GROUP)) == "ok"
    assert as_user(pair, ("chmod", f"{p}_mine", 0o2755)) == "ok"
    assert pair.run(("stat", f"{p}_mine"))[0] == "-rwxr-xr-x"
    pair.check()


@each_place
def test_who_may_set_times(pair: Pair, place: str) -> None:
    p = place
    assert as_user(pair, ("utimensat", f"{p}_shared", "now", "now")) == "ok"
    assert as_user(pair, ("utimensat", f"{p}_shared", 10**18, 10**18)) == "EPERM"
    assert as_user(pair, ("utimensat", f"{p}_ro", "now", "now")) == "EACCES"
    assert as_user(pair, ("utimensat", f"{p}_mine", 10**18, 10**18)) == "ok"
    assert pair.run(("mtime", f"{p}_mine")) == 10**18
    pair.check()


def test_the_user_cannot_see_into_a_private_directory(pair: Pair) -> None:
    assert pair.run(("chmod", "lo_mydir", 0o700)) == "ok"
    assert pair.run(("chown", "lo_mydir", 0, 0)) == "ok"
    for place in PLACES:
        assert as_user(pair, ("listdir", f"{place}_rodir")) == ["x"]
    assert as_user(pair, ("listdir", "lo_mydir")) == "EACCES"
    assert as_user(pair, ("open", "lo_mydir/f", "cx")) == "EACCES"
    pair.check()
