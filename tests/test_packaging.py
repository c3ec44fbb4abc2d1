"""What the package ships besides its code (issue 13): type information for users of the API
(PEP 561 ``py.typed``, checked with ``mypy --strict`` from a separate project against an installed
copy), examples in every subcommand's ``--help``, and the shell completion and man page that
``make setup`` generates from the same parser (scripts/shell-files.sh)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

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
