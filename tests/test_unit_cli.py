"""Command-line parsing without mounting: options, kernel-style helper arguments, layer lists."""

from pathlib import Path

import pytest

from cowfs.cli import build_parser, helper_arguments, mount_helper_main
from cowfs.core.errors import CowfsError
from cowfs.core.layers import LayerPaths
from cowfs.daemon.mount import MountOptions


def test_mount_options_parse() -> None:
    opts = MountOptions.parse(["allow_other,timeout=2.5", "ro,nosuid", "defaults"])
    assert opts.allow_other
    assert opts.timeout == 2.5
    assert opts.read_only
    assert opts.kernel == frozenset({"ro", "nosuid"})
    assert not opts.debug


@pytest.mark.parametrize("bad", ["bogus", "timeout=abc", "timeout=-1", "timeout=nan"])
def test_bad_mount_options_are_user_errors(bad: str) -> None:
    with pytest.raises(CowfsError):
        MountOptions.parse([bad])


@pytest.mark.parametrize(("bad", "says"), [
    ("debug=1", "'debug' takes no value"), ("nosuid=yes", "'nosuid' takes no value"),
    ("metacopy=yes", "'metacopy' takes no value"), ("timeout", "'timeout' needs a value"),
    ("partial_copyup=", "'partial_copyup' needs a value"),
])
def test_a_flag_with_a_value_and_a_value_missing_are_named(bad: str, says: str) -> None:
    with pytest.raises(CowfsError, match=says):
        MountOptions.parse([bad])


def test_every_option_of_the_tables_sets_its_field_and_the_last_given_wins() -> None:
    assert MountOptions.parse(["metacopy,nometacopy"]).metacopy is False
    assert MountOptions.parse(["nometacopy", "metacopy"]).metacopy is True
    assert MountOptions.parse(["strictatime,noatime"]).atime == "noatime"
    assert MountOptions.parse(["partial_copyup=2M,nopartial_copyup"]).partial_min == 0
    assert MountOptions.parse(["nopartial_copyup,partial_copyup=2M"]).partial_min == 2 << 20
    assert MountOptions.parse(["writeback,nowriteback,relocate"]) == MountOptions(relocate=True)


def test_the_kernels_overlay_option_names_are_accepted() -> None:
    """An fstab line converted from ``overlay`` keeps the kernel's spellings (issue 21)."""
    opts = MountOptions.parse(["default_permissions,index=on,redirect_dir=on,userxattr",
                               "metacopy=on,xino=auto,nfs_export=off"])
    assert opts.metacopy
    assert opts.kernel == frozenset()
    assert not MountOptions.parse(["metacopy=on,metacopy=off"]).metacopy


@pytest.mark.parametrize(("option", "reason"), [
    ("index=off", "hard-link index"), ("redirect_dir=nofollow", "redirects"),
    ("redirect_dir=off", "redirects"), ("nfs_export=on", "NFS")])
def test_kernel_options_cowfs_cannot_honour_are_refused_with_the_reason(option: str,
                                                                         reason: str) -> None:
    with pytest.raises(CowfsError, match=f"{option!r} is not supported: .*{reason}"):
        MountOptions.parse([option])


def test_fuse_options_keep_default_permissions() -> None:
    opts = MountOptions.parse(["allow_other"]).fuse_options("cowfs")
    assert {"default_permissions", "allow_other", "fsname=cowfs", "subtype=cowfs"} <= opts


def test_helper_splits_layer_options() -> None:
    assert helper_arguments(["rw,lowerdir=/a:/b,upperdir=/u,workdir=/w,noatime"]) == (
        "/a:/b", "/u", "/w", ["rw", "noatime"])


def test_helper_without_upper_is_a_user_error() -> None:
    with pytest.raises(CowfsError, match="upperdir"):
        helper_arguments(["lowerdir=/a"])


@pytest.mark.parametrize(("options", "message"), [
    ("remount,ro", "is not a mount point"),
    ("remount,bogus", "unknown mount option 'bogus'"),  # refused before anything else
])
def test_a_remount_of_what_is_not_mounted_is_a_user_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], options: str, message: str) -> None:
    assert mount_helper_main(["cowfs", str(tmp_path), "-o", options]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mount.fuse.cowfs: error: "), err
    assert message in err, err
    assert err.count("\n") == 1, err


def test_layer_paths_topmost_first() -> None:
    paths = LayerPaths.parse("/l2:/l1", "/u")
    assert paths.lowers == (Path("/l2"), Path("/l1"))
    assert paths.work_dir == Path("/u/.cowfs-work")


@pytest.mark.parametrize("bad", ["", "/a::/b", ":/a", "/a:"])
def test_empty_lower_elements_are_refused(bad: str) -> None:
    with pytest.raises(CowfsError):
        LayerPaths.parse(bad, "/u")


def test_parser_requires_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([])
    assert exc.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "expected"), [
    (["reset", "/u", "--yes", "src/g"], {"upper": "/u", "paths": ["src/g"], "yes": True}),
    (["reset", "-n", "/u", "a", "--yes", "b"], {"paths": ["a", "b"], "yes": True,
                                                "dry_run": True}),
    (["diff", "/u", "--json", "--lower", "a:b"], {"target": "/u", "lower": "a:b", "json": True}),
    (["export", "/u", "-o", "x.tar", "--lower", "L"], {"target": "/u", "output": "x.tar"}),
    (["mount", "a", "-o", "ro", "b", "c", "-f"], {"upper": "b", "mountpoint": "c",
                                                  "foreground": True, "options": ["ro"]}),
    (["commit", "/u", "--into", "/b", "--yes"], {"upper": "/u", "into": "/b", "yes": True}),
    (["check", "/u", "--repair", "--lower", "L", "-y"], {"upper": "/u", "repair": True}),
    (["import", "x.tar", "d"], {"archive": "x.tar", "dir": "d"}),
    (["umount", "/m", "--timeout", "3"], {"mountpoint": "/m", "timeout": 3.0}),
    (["run", "B", "--at", "/v", "--", "ls", "-l", "--at"], {"base": "B", "at": "/v",
                                                            "command": ["ls", "-l", "--at"]}),
    (["run", "--at", "/v", "B", "ls", "--at", "x"], {"base": "B", "at": "/v",
                                                     "command": ["ls", "--at", "x"]}),
    (["run", "B", "--", "--help"], {"base": "B", "command": ["--help"]}),
    (["layer", "list", "--json", "S"], {"stack": "S", "json": True, "lowers": False}),
    (["layer", "squash", "S", "ab", "--", "-x"], {"stack": "S", "layers": ["ab", "-x"]}),
    (["layer", "init", "S", "B:C"], {"stack": "S", "base": "B:C"}),
    (["mount", "S", "-o", "ro", "M"], {"lower": "S", "upper": "M", "mountpoint": None}),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_options_and_paths_mix_in_any_order(argv: list[str], expected: dict[str, object]) -> None:
    """As documented (docs/workspaces.md: ``cowfs reset /tmp/proj.changes --yes src/generated``);
    ``run`` mixes them before ``--``, and without ``--`` everything after BASE is the command."""
    parsed = vars(build_parser().parse_args(argv))
    assert {key: parsed[key] for key in expected} == expected


def test_counts_take_the_noun_in_their_number() -> None:
    """Issue 21: "1 entries", "all 1 changes" in the commands' output."""
    from cowfs.core.wording import counted

    assert counted(1, "entry", "entries") == "1 entry"
    assert counted(0, "entry", "entries") == "0 entries"
    assert counted(2, "member") == "2 members"
