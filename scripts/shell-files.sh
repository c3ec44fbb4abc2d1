#!/bin/bash
# Generate the shell completion (bash, zsh) and the man page of `cowfs` from its argument parser
# (cowfs.cli.build_parser): shtab for the completion, argparse-manpage for the man page.
#
#   scripts/shell-files.sh PYTHON SHARE_DIR
#
# PYTHON: an interpreter with cowfs, shtab and argparse-manpage (make setup: .venv/bin/python).
# Writes SHARE_DIR/bash-completion/completions/cowfs, SHARE_DIR/zsh/site-functions/_cowfs and
# SHARE_DIR/man/man1/cowfs.1 (make setup: SHARE_DIR=.venv/share, which `man` finds by itself
# when .venv/bin is on PATH).
set -euo pipefail
python=$1
share=$2
mkdir -p "$share/bash-completion/completions" "$share/zsh/site-functions" "$share/man/man1"
"$python" -m shtab --shell=bash cowfs.cli.build_parser >"$share/bash-completion/completions/cowfs"
"$python" -m shtab --shell=zsh cowfs.cli.build_parser >"$share/zsh/site-functions/_cowfs"
version=$("$python" -c 'import cowfs; print(cowfs.__version__)')
# An EXAMPLES section from the "examples:" of every subcommand's --help (argparse-manpage leaves
# the subcommands' epilogs out).
examples=$(mktemp)
trap 'rm -f "$examples"' EXIT
"$python" - >"$examples" <<'PY'
import argparse
from cowfs.cli import build_parser

def roff(text: str) -> str:
    return text.replace("\\", "\\e").replace("-", "\\-").replace("'", "\\(aq")

print("[EXAMPLES]")
action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
for name, sub in action.choices.items():
    lines = (sub.epilog or "").splitlines()
    if "examples:" not in lines:
        continue
    print(f".SS cowfs {name}\n.nf")
    for line in lines[lines.index("examples:") + 1:]:
        if not line.strip():
            break
        print(roff(line))
    print(".fi")
PY
"$python" -c "import sys; from argparse_manpage.cli import main; sys.argv[0] = 'argparse-manpage'; sys.exit(main())" --module cowfs.cli --function build_parser --prog cowfs \
    --project-name cowfs --version "$version" --manual-title "cowfs manual" \
    --description "a copy-on-write overlay filesystem (FUSE)" --include "$examples" \
    --output "$share/man/man1/cowfs.1"
