"""What the package ships besides its code (issue 13): type information for users of the API
(PEP 561 ``py.typed``, checked with ``mypy --strict`` from a separate project against an installed
copy), examples in every subcommand's ``--help``, the shell completion and man page that
``make setup`` generates from the same parser (scripts/shell-files.sh), and ``make
system-install``: cowfs installed for a machine's users without the checkout, its mount helper
used by ``mount -t fuse.cowfs``."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import DEFAULT_LOWERS, DEFAULT_UPPER, LayerFactory
from support import fuse_device_holders, needs_root, process_gone, tree_state, wait_until

from cowfs.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


# --- --help --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_subcommand_help_shows_examples(name: str) -> None:
    text = _subcommands()[name].format_help()
    lines = text.splitlines()
    assert "examples:" in lines, text
    examples = lines[lines.index("examples:") + 1:]
    assert any(line.strip().startswith(("cowfs ", "zcat ")) and f"cowfs {name}" in line
               for line in examples), text


# --- completion and man page ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shell_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/shell-files.sh run as ``make setup`` runs it, into a scratch share directory."""
    share = tmp_path_factory.mktemp("share")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                  "")])}
    subprocess.run(["bash", str(ROOT / "scripts/shell-files.sh"), sys.executable, str(share)],
                   check=True, env=env, timeout=120)
    return share


def test_bash_completion_lists_every_subcommand_and_option(shell_files: Path) -> None:
    script = shell_files / "bash-completion/completions/cowfs"
    subprocess.run(["bash", "-n", str(script)], check=True)
    listed = subprocess.run(
        ["bash", "-c", f'source "{script}"; echo "${{_shtab_cowfs_subparsers[@]}}"'],
        check=True, capture_output=True, text=True).stdout.split()
    assert sorted(listed) == sorted(_subcommands())
    text = script.read_text()
    for name, parser in _subcommands().items():
        for option in _options(parser):
            assert option in text, (name, option)


def test_bash_completion_completes_a_subcommand(shell_files: Path) -> None:
    """What a user gets for ``cowfs co<TAB>`` and ``cowfs commit --ver<TAB>``."""
    script = shell_files / "bash-completion/completions/cowfs"
    probe = f"""
        source "{script}"
        complete_line() {{
            COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="$*"; COMP_POINT=${{#COMP_LINE}}
            COMPREPLY=(); _shtab_cowfs; echo "${{COMPREPLY[@]}}"
        }}
        complete_line cowfs co
        complete_line cowfs commit --ver
    """
    out = subprocess.run(["bash", "-c", probe], check=True, capture_output=True,
                         text=True).stdout.splitlines()
    assert out[0].split() == ["commit"]
    assert out[1].split() == ["--verbose"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_parses(shell_files: Path) -> None:
    subprocess.run(["zsh", "-n", str(shell_files / "zsh/site-functions/_cowfs")], check=True)


def test_zsh_completion_names_every_subcommand_and_option(shell_files: Path) -> None:
    text = (shell_files / "zsh/site-functions/_cowfs").read_text()
    for name, parser in _subcommands().items():
        assert f"\n    {name}:'" in text, name
        for option in _options(parser):
            assert option in text, (name, option)


def test_man_page_mentions_every_subcommand_option_and_example(shell_files: Path) -> None:
    page = shell_files / "man/man1/cowfs.1"
    roff = page.read_text()
    assert roff.startswith(".TH COWFS")
    # The text as the reader sees it: roff's "\-" is a "-".
    text = roff.replace("\\-", "-")
    for name, parser in _subcommands().items():
        assert f"COMMAND \\fI\\,'cowfs {name}'" in text, name
        for option in _options(parser):
            if option != "--help":  # the man page has no --help to show
                assert option in text, (name, option)
    assert ".SH EXAMPLES" in text
    # -o's list, the exit statuses and the fstab form, from docs/cli.md (issue 21: the page said
    # "see below" and nothing followed)
    for section in ("MOUNT OPTIONS", "EXIT STATUS", "FILES"):
        assert f".SH {section}" in text, section
    for option in ("allow_other", "partial_copyup=SIZE", "metacopy=on"):
        assert option in text, option
    assert "lowerdir=/srv/a:/srv/b,upperdir=/srv/u,workdir=/srv/w" in text
    assert "cowfs run --diff-out changes.json /data -- make" in text
    if shutil.which("man"):
        shown = subprocess.run(["man", "-l", str(page)], check=True, capture_output=True,
                               text=True, env={**os.environ, "MANWIDTH": "100"}).stdout
        assert "cowfs commit /tmp/changes --into /data --yes" in shown


# --- py.typed: the API as users' mypy sees it ----------------------------------------------------

CLIENT = '''\
from pathlib import Path

import cowfs
from cowfs import CowfsError, View


def changed(base: Path) -> str:
    try:
        with cowfs.overlay(base) as view:
            assert isinstance(view, View)
            (view.path / "x").write_text("x")
            summary: str = view.summary()
            committed: str = view.commit()
            return summary + committed
    except CowfsError as e:
        return str(e)
'''

WRONG = '''\
import cowfs

def count(base: str) -> int:
    with cowfs.overlay(base) as view:
        return view.summary()
'''


def _mypy(project: Path) -> subprocess.CompletedProcess[str]:
    venv = project / "venv"
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--python-executable", str(venv / "bin/python"), str(project / "client.py")],
        capture_output=True, text=True, timeout=300, cwd=project, check=False)


@pytest.mark.slow
def test_the_installed_api_is_typed_for_mypy_strict(tmp_path: Path) -> None:
    """cowfs installed (not editable) into a fresh virtualenv, and a client project checked with
    ``mypy --strict`` against it: correct code passes, and a type error in the use of the API is
    found (an untyped package would make the API ``Any`` and hide it)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run(
        [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True).stdout.strip())
    build = tmp_path / "build"
    shutil.copytree(ROOT, build, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "__pycache__", "tests", "bench", "docs"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "--target", str(site),
                    str(build)], check=True, timeout=300)
    assert (site / "cowfs/py.typed").is_file(), "py.typed is not installed with the package"
    # cowfs's own dependencies (trio, pyfuse3, ...) from this interpreter, after cowfs itself.
    (site / "zz-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (tmp_path / "client.py").write_text(CLIENT)
    good = _mypy(tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr
    (tmp_path / "client.py").write_text(WRONG)
    bad = _mypy(tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert 'Incompatible return value type (got "str", expected "int")' in bad.stdout, bad.stdout


# --- make system-install: cowfs without the checkout ---------------------------------------------

#: Run inside a private mount namespace (unshare): /usr/sbin gets an overlay of the kernel's on a
#: tmpfs, in which mount.fuse.cowfs is the installed helper, so that ``mount -t fuse.cowfs`` runs
#: it while the machine's /usr/sbin stays as it is; gone with the namespace.
_MOUNT_IN_PRIVATE = r'''
set -eu
helper=$1 scratch=$2 lowers=$3 upper=$4 work=$5 mnt=$6
mount -t tmpfs cowfs-test "$scratch"
mkdir "$scratch/upper" "$scratch/work"
mount -t overlay overlay -o "lowerdir=/usr/sbin,upperdir=$scratch/upper,workdir=$scratch/work" \
    /usr/sbin
ln -sfn "$helper" /usr/sbin/mount.fuse.cowfs
trap 'umount "$mnt" 2>/dev/null || true' EXIT
mount -t fuse.cowfs -o "lowerdir=$lowers,upperdir=$upper,workdir=$work" cowfs "$mnt"
awk -v m="$mnt" '$2 == m {print "mounted:", $3}' /proc/mounts
cat "$mnt/a.txt"
echo written >"$mnt/b.txt"
umount "$mnt"
'''


def _without_checkout_env() -> dict[str, str]:
    """The environment less what would lead an interpreter back to a checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_system_install_mounts_through_mount_t_without_the_checkout(
        tmp_path: Path, layers: LayerFactory) -> None:
    """``make system-install`` from a copy of the checkout into a scratch PREFIX and SBINDIR,
    the copy deleted, then ``mount -t fuse.cowfs`` through the installed helper (in a private
    mount namespace: the machine's /usr/sbin is not touched), and ``make system-uninstall``.
    Needs the Python package index, as ``make install`` does (pyfuse3's source, the
    dependencies)."""
    needs_root("mount -t fuse.cowfs, and an overlay on /usr/sbin in a private mount namespace")
    env = _without_checkout_env()
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("Makefile", "pyproject.toml", "README.md", "cowfs", "scripts", "patches"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, copy / name)
    (copy / "docs").mkdir()
    shutil.copy(ROOT / "docs/cli.md", copy / "docs/cli.md")
    prefix, sbin = tmp_path / "prefix", tmp_path / "sbin"
    where = [f"PREFIX={prefix}", f"SBINDIR={sbin}", "PYTHON=python3"]
    installed = subprocess.run(["make", "-C", str(copy), "system-install", *where], env=env,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=840, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    shutil.rmtree(copy)  # what is installed must not need it
    venv = prefix / "lib/cowfs"
    helper = sbin / "mount.fuse.cowfs"
    assert os.readlink(helper) == str(venv / "bin/mount.fuse.cowfs")
    assert os.readlink(prefix / "bin/cowfs") == str(venv / "bin/cowfs")
    assert (prefix / "share/man/man1/cowfs.1").resolve().is_file()
    imported = subprocess.run([str(venv / "bin/python"), "-c",
                               "import cowfs, pyfuse3; print(cowfs.__file__)"], env=env, cwd="/",
                              capture_output=True, text=True, timeout=60, check=True).stdout
    assert imported.startswith(str(venv)), imported
    version = subprocess.run([str(prefix / "bin/cowfs"), "--version"], env=env, cwd="/",
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert "cowfs" in version

    layer_set = layers(*DEFAULT_LOWERS, upper=DEFAULT_UPPER)
    lowers_before = [tree_state(p) for p in layer_set.lowers]
    scratch = tmp_path / "private"
    scratch.mkdir()
    holders_before = fuse_device_holders()
    try:
        mounted = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "bash", "-c", _MOUNT_IN_PRIVATE,
             "mount-in-private", str(helper), str(scratch),
             ":".join(map(str, layer_set.lowers)), str(layer_set.upper), str(layer_set.work),
             str(layer_set.mnt)], env=env, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=120, check=False)
    finally:
        daemons = fuse_device_holders() - holders_before
        exited = wait_until(lambda: all(process_gone(p) for p in daemons), 15)
        for pid in daemons:
            if not process_gone(pid):
                os.kill(pid, 9)
    assert mounted.returncode == 0, mounted.stdout + mounted.stderr
    assert "Traceback" not in mounted.stderr
    assert mounted.stdout.splitlines() == ["mounted: fuse.cowfs", "lower0:a.txt"]
    assert exited, f"daemon {daemons} still running 15 s after umount"
    assert (layer_set.upper / "b.txt").read_text() == "written\n"
    for path, before in zip(layer_set.lowers, lowers_before, strict=True):
        assert tree_state(path) == before

    removed = subprocess.run(["make", "-C", str(ROOT), "system-uninstall", *where], env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=120, check=False)
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert not venv.exists()
    assert not os.path.lexists(helper)
    assert [p for p in prefix.rglob("*") if not p.is_dir()] == []
