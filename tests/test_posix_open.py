"""POSIX open(2) flags on lower-only, upper-only and merged objects, differential against the
kernel's overlayfs: O_CREAT|O_EXCL, O_APPEND, O_TRUNC, O_DIRECTORY, O_NOFOLLOW."""

from __future__ import annotations

import pytest
from conformance_support import Pair, each_place, standard_pair_fixture

pytestmark = pytest.mark.kernel


pair = pytest.fixture(standard_pair_fixture, name="pair")

#: The ``user.layer`` xattr of the file each place's name shows.
SERVED_BY = {"lo": b"lower", "up": b"upper", "mg": b"upper"}


@each_place
def test_creat_excl_fails_on_every_existing_kind(pair: Pair, place: str) -> None:
    for kind in ("f", "d", "e", "l"):
        assert pair.run(("open", f"{place}_{kind}", "O_WRONLY|O_CREAT|O_EXCL")) == "EEXIST"
    pair.check()


@each_place
def test_creat_excl_on_a_dangling_symlink_fails_and_creat_creates_its_target(
    pair: Pair, place: str
) -> None:
    assert pair.run(("unlink", f"{place}_f")) == "ok"
    assert pair.run(("open", f"{place}_l", "O_WRONLY|O_CREAT|O_EXCL")) == "EEXIST"
    assert pair.run(("open", f"{place}_l", "O_WRONLY|O_CREAT", 0o600)) == "ok"
    assert pair.run(("stat", f"{place}_f"))[0] == "-rw-------"
    assert pair.run(("read", f"{place}_f")) == b""
    pair.check()


@each_place
def test_creat_excl_makes_a_new_file_in_each_kind_of_directory(pair: Pair, place: str) -> None:
    for d in (f"{place}_d", f"{place}_e"):
        assert pair.run(("open", f"{d}/new", "O_WRONLY|O_CREAT|O_EXCL", 0o640)) == "ok"
        assert pair.run(("stat", f"{d}/new"))[0] == "-rw-r-----"
        assert pair.run(("open", f"{d}/new", "O_WRONLY|O_CREAT|O_EXCL")) == "EEXIST"
    pair.check_remounted()


@each_place
def test_creat_below_a_file_is_enotdir(pair: Pair, place: str) -> None:
    assert pair.run(("open", f"{place}_f/x", "O_WRONLY|O_CREAT")) == "ENOTDIR"
    pair.check()


@each_place
def test_append_writes_at_the_end_whatever_the_offset(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    before = pair.run(("read", f))
    assert pair.run(("open_write", f, "O_WRONLY|O_APPEND", b"+tail", 0)) == len(before) + 5
    assert pair.run(("open_write", f, "O_RDWR|O_APPEND", b"+more", 1)) == len(before) + 10
    assert pair.run(("read", f)) == before + b"+tail+more"
    pair.check()


@each_place
def test_trunc_empties_the_file_and_keeps_its_metadata(pair: Pair, place: str) -> None:
    f = f"{place}_f"
    mode = pair.run(("stat", f))
    assert pair.run(("open", f, "O_WRONLY|O_TRUNC")) == "ok"
    assert pair.run(("read", f)) == b""
    assert pair.run(("stat", f)) == (*mode[:4], 0)
    # The truncated file is the same object: it keeps the xattrs of the layer that served it (a
    # merged name is served by the upper).
    assert pair.run(("getxattr", f, "user.layer")) == SERVED_BY[place]
    pair.check_remounted()


@each_place
def test_rdonly_with_trunc_truncates_as_linux_does(pair: Pair, place: str) -> None:
    assert pair.run(("open", f"{place}_f", "O_RDONLY|O_TRUNC")) == "ok"
    assert pair.run(("read", f"{place}_f")) == b""
    pair.check()


@each_place
def test_directory_flag(pair: Pair, place: str) -> None:
    assert pair.run(("open", f"{place}_d", "O_RDONLY|O_DIRECTORY")) == "ok"
    assert pair.run(("open", f"{place}_e", "O_RDONLY|O_DIRECTORY")) == "ok"
    assert pair.run(("open", f"{place}_f", "O_RDONLY|O_DIRECTORY")) == "ENOTDIR"
    assert pair.run(("open", f"{place}_l", "O_RDONLY|O_DIRECTORY")) == "ENOTDIR"
    assert pair.run(("open", f"{place}_d/", "O_RDONLY")) == "ok"
    assert pair.run(("open", f"{place}_f/", "O_RDONLY")) == "ENOTDIR"
    pair.check()


@each_place
def test_nofollow_refuses_a_symlink_but_not_its_target(pair: Pair, place: str) -> None:
    assert pair.run(("open", f"{place}_l", "O_RDONLY|O_NOFOLLOW")) == "ELOOP"
    assert pair.run(("open", f"{place}_l", "O_WRONLY|O_NOFOLLOW")) == "ELOOP"
    assert pair.run(("open", f"{place}_l", "O_PATH|O_NOFOLLOW")) == "ok"
    assert pair.run(("open", f"{place}_f", "O_RDONLY|O_NOFOLLOW")) == "ok"
    assert pair.run(("open", f"{place}_l", "O_RDONLY")) == "ok"
    pair.check()


@each_place
def test_a_directory_cannot_be_opened_for_writing(pair: Pair, place: str) -> None:
    for how in ("O_WRONLY", "O_RDWR", "O_WRONLY|O_CREAT", "O_RDONLY|O_TRUNC"):
        assert pair.run(("open", f"{place}_d", how)) == "EISDIR", how
    pair.check()


@each_place
def test_excl_without_creat_opens_an_existing_file(pair: Pair, place: str) -> None:
    assert pair.run(("open", f"{place}_f", "O_RDONLY|O_EXCL")) == "ok"
    pair.check()
