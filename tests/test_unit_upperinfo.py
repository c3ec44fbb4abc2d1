"""Unit tests (no FUSE) of what an upper records about itself and of the mount state file: the
formats in :mod:`cowfs.core.schema`, the checks in :mod:`cowfs.core.upperinfo`, the journal's
records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cowfs.core import schema, upperinfo
from cowfs.core.errors import CowfsError
from cowfs.daemon.mount import MountOptions
from cowfs.tools.journal import Journal, Op, Step

A = schema.LayerIdentity("/a", 1, 10)
B = schema.LayerIdentity("/b", 1, 20)


def test_stack_record_round_trip() -> None:
    record = schema.StackRecord((A, B), "/w")
    assert schema.StackRecord.from_json(record.to_json()) == record
    assert schema.StackRecord.from_json(schema.StackRecord((A,)).to_json()).work is None


@pytest.mark.parametrize("value", [
    b"", b"not json", b"[]", b'{"version": 2, "lowers": []}', b'{"version": 1}',
    b'{"version": 1, "lowers": []}', b'{"version": 1, "lowers": [{"path": "rel", "dev": 1, '
    b'"ino": 2}]}', b'{"version": 1, "lowers": [{"path": "/a", "dev": "x", "ino": 2}]}',
    b'{"version": 1, "lowers": [{"path": "/a", "dev": 1, "ino": 2}], "work": "rel"}', b"\xff",
    b'{"version": 1, "lowers": [{"path": "/a", "dev": 1e400, "ino": 2}]}',
    b'{"version": 1, "lowers": [{"path": "/a", "dev": 1, "ino": 18446744073709551616}]}',
    b'{"version": 1, "lowers": [{"path": "/a/../b", "dev": 1, "ino": 2}]}',
    b'{"version": 1, "lowers": [{"path": "/a", "dev": 1, "ino": 2}], "work": "/w/.."}',
    b'{"version": 1, "lowers": [{"path": "/a", "dev": 1, "ino": 2, "x": 0}]}',
    b"[" * 3000 + b"]" * 3000, b'{"version": 1, "lowers": ' + b"[" * 3000 + b"]" * 3000 + b"}",
])
def test_malformed_stack_records_are_refused(value: bytes) -> None:
    with pytest.raises(ValueError, match="stack record"):
        schema.StackRecord.from_json(value)


def test_stack_difference_says_what_differs() -> None:
    record = schema.StackRecord((A, B))
    assert upperinfo.stack_difference(record, (A, B)) is None
    assert "2 lower layers" in (upperinfo.stack_difference(record, (A,)) or "")
    moved = schema.LayerIdentity("/moved", 1, 20)
    found = upperinfo.stack_difference(record, (A, moved)) or ""
    assert found.startswith("lower layer 2 was '/b'")
    assert "'/moved'" in found
    copied = schema.LayerIdentity("/b", 1, 21)
    assert "inode 21" in (upperinfo.stack_difference(record, (A, copied)) or "")


def test_mount_state_round_trip_and_refusal() -> None:
    state = schema.MountState(42, "/m", ("/a", "/b"), "/u", "/u/.cowfs-work")
    assert schema.MountState.from_json(state.to_json()) == state
    for text in ("{}", "[]", '{"pid": 1, "mountpoint": "/m", "lowers": "x", "upper": "/u", '
                 '"work": "/w"}', "nope"):
        with pytest.raises(ValueError):  # noqa: PT011 (json's and ours, both ValueError)
            schema.MountState.from_json(text)


def test_default_work_dir() -> None:
    assert schema.default_work_dir(Path("/u")) == Path("/u/.cowfs-work")


def test_journal_round_trip() -> None:
    journal = Journal("/u", "/b", (Step(Op.STAGE, "old", "0"),
                      Step(Op.MOVE, "new", "0", "old"), Step(Op.WRITE, "f", index="1-2"),
                      Step(Op.LINK, "g", "d/f"), Step(Op.ATTRS, ".")), "1 renamed")
    assert Journal.from_json(journal.to_json()) == journal
    with pytest.raises(ValueError, match="journal"):
        Journal.from_json('{"version": 1, "steps": [["NOPE", "", "", "", null]]}')


def _plan(*steps: str) -> str:
    return ('{"version": 2, "upper": "/u", "base": "/b", "summary": "s", "steps": ['
            + ", ".join(steps) + "]}")


@pytest.mark.parametrize("step", [
    '["REMOVE", "../outside/victim", "", "", null]', '["WRITE", "a/../../x", "", "", null]',
    '["REMOVE", "/etc/passwd", "", "", null]', '["REMOVE", "a//b", "", "", null]',
    '["REMOVE", ".", "", "", null]', '["REMOVE", "", "", "", null]',
    '["LINK", "f", "../../etc/shadow", "", null]', '["STAGE", "d", "../x", "", null]',
    '["MOVE", "d", "0", "../x", null]', '["WRITE", "f", "", "", "../x"]',
    '["REMOVE", "f", "", "", "1-2"]', '["NOPE", "f", "", "", null]',
    '["REMOVE", "f", "", ""]', '["REMOVE", "f", "", "", null, "extra"]',
])
def test_journal_steps_that_could_leave_the_layers_are_refused(step: str) -> None:
    Journal.from_json(_plan('["REMOVE", "f", "", "", null]'))
    with pytest.raises(ValueError, match="journal"):
        Journal.from_json(_plan(step))


@pytest.mark.parametrize("text", [
    "[" * 3000 + "]" * 3000, '{"version": 2, "upper": "/u", "base": "/b", "summary": "s", '
    '"steps": ' + "[" * 3000 + "]" * 3000 + "}", _plan().replace('"/u"', '"u"'),
    _plan().replace('"/b"', '"/b/../c"'), _plan().replace("}", ', "work": "/etc"}'),
])
def test_malformed_journals_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match="journal") as refused:
        Journal.from_json(text)
    assert "\n" not in str(refused.value)


def test_commit_mark_round_trip_and_refusal() -> None:
    mark = schema.CommitMark("/b", "0" * 64)
    assert schema.CommitMark.from_json(mark.to_json()) == mark
    for value in (b"/b", b'{"version": 1, "base": "/b", "plan": "x"}',
                  b'{"version": 1, "base": "b", "plan": "' + b"0" * 64 + b'"}'):
        with pytest.raises(ValueError, match="commit mark"):
            schema.CommitMark.from_json(value)


def test_upper_format(tmp_path: Path) -> None:
    assert not upperinfo.upper_format_at(tmp_path)
    assert not upperinfo.upper_format_at(tmp_path / "missing")
    with pytest.raises(CowfsError, match="not a cowfs upper"):
        upperinfo.require_upper(tmp_path, "reset")
    os.setxattr(tmp_path, schema.XATTR_FORMAT, schema.FORMAT_VERSION)
    assert upperinfo.upper_format_at(tmp_path)
    upperinfo.require_upper(tmp_path, "reset")
    os.setxattr(tmp_path, schema.XATTR_FORMAT, b"7")
    with pytest.raises(CowfsError, match="format '7'"):
        upperinfo.upper_format_at(tmp_path)


def test_record_and_verify_stack(tmp_path: Path) -> None:
    lower, other, upper = tmp_path / "l", tmp_path / "o", tmp_path / "u"
    for d in (lower, other, upper):
        d.mkdir()
    fd = os.open(upper, os.O_PATH | os.O_DIRECTORY)
    try:
        upperinfo.record_stack(fd, upper, upperinfo.identities([lower]), None)
        assert upperinfo.recorded_lowers(upper) == (lower,)
        upperinfo.verify_stack(upper, upperinfo.identities([lower]), relocate=False,
                               what="mount", override="-o relocate")
        with pytest.raises(CowfsError, match="another lower stack"):
            upperinfo.verify_stack(upper, upperinfo.identities([other]), relocate=False,
                                   what="mount", override="-o relocate")
        upperinfo.verify_stack(upper, upperinfo.identities([other]), relocate=True,
                               what="mount", override="-o relocate")
        too_long = [schema.LayerIdentity("/" + "x" * 200, 1, n) for n in range(20)]
        with pytest.raises(CowfsError, match="too long to record"):
            upperinfo.record_stack(fd, upper, too_long, None)
    finally:
        os.close(fd)


def test_relocate_is_a_mount_option() -> None:
    assert MountOptions.parse(["relocate"]).relocate
    assert not MountOptions.parse(["ro"]).relocate


@pytest.mark.parametrize("path", ["..", "../x", "a/../../x", "/etc/passwd", "a//b", "a/./b", ".",
                                  "", "a/"])
def test_parent_of_refuses_paths_that_could_leave_the_root(tmp_path: Path, path: str) -> None:
    from cowfs.tools.plans import parent_of

    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(CowfsError, match="could leave the layer"), parent_of(fd, path):
            pass
    finally:
        os.close(fd)


def test_a_recorded_work_directory_is_used_only_when_it_is_the_uppers(tmp_path: Path) -> None:
    upper, work = tmp_path / "u", tmp_path / "w"
    upper.mkdir()
    work.mkdir(mode=0o700)
    assert upperinfo.open_work_dir(upper, tmp_path / "missing") is None
    with pytest.raises(CowfsError, match=r"does not carry the user\.cowfs\.upper mark"):
        upperinfo.open_work_dir(upper, work)
    st = os.stat(upper)
    os.setxattr(work, schema.XATTR_WORK_UPPER, schema.format_work_upper(st.st_dev, st.st_ino))
    fd = upperinfo.open_work_dir(upper, work)
    assert fd is not None
    assert os.path.samestat(os.fstat(fd), os.stat(work))
    os.close(fd)
    work.chmod(0o770)
    with pytest.raises(CowfsError, match="writable by other users"):
        upperinfo.open_work_dir(upper, work)
    work.chmod(0o700)
    (tmp_path / "link").symlink_to(work)
    with pytest.raises(CowfsError, match="is not that upper's"):
        upperinfo.open_work_dir(upper, tmp_path / "link")
    # The default one: a symlink there is no work directory at all.
    (upper / schema.WORK_DIR_NAME).symlink_to(work)
    assert upperinfo.open_work_dir(upper, None) is None
