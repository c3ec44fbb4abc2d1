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
# MOUNT OPTIONS, EXIT STATUS and the fstab form, from docs/cli.md (their one source): its tables
# become tagged paragraphs, its fstab line a literal block.
"$python" - "$(dirname "$0")/../docs/cli.md" >>"$examples" <<'PY'
import re
import sys

def roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-").replace("'", "\\(aq")
    text = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", text)  # [words](link): the words
    return re.sub(r"`([^`]*)`", r"\\fB\1\\fR", text).replace("**", "")

def table(lines: list[str], heading: str) -> list[str]:
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) == 2 and not set(cells[0]) <= set("- ") and cells[0] not in ("Option", "Status"):
            rows.append(f".TP\n{roff(cells[0])}\n{roff(cells[1])}")
    return rows

lines = open(sys.argv[1]).read().splitlines()
print("[MOUNT OPTIONS]")
print("Given with \\fB\\-o\\fR to \\fBcowfs mount\\fR (several separated by commas, or several \\fB\\-o\\fR).")
print("\n".join(table(lines, "### Mount options (`-o`)")))
print("[EXIT STATUS]")
print("\n".join(table(lines, "## Exit statuses")))
fstab = next(i for i, l in enumerate(lines) if l.startswith("The same mount as a line of /etc/fstab"))
opening = lines.index("```", fstab)
block = lines[opening + 1: lines.index("```", opening + 1)]
print("[FILES]\n.TP\n\\&/etc/fstab\nA cowfs mount as a line of /etc/fstab (with \\fBmake helper\\fR's mount.fuse.cowfs):\n.nf")
# argparse-manpage takes a line that starts with "/" or "[" for a header: "\&" before it.
print("\n".join(re.sub(r"^(?=[/[])", r"\\&", roff(l)) for l in block))
print(".fi")
PY
"$python" -c "import sys; from argparse_manpage.cli import main; sys.argv[0] = 'argparse-manpage'; sys.exit(main())" --module cowfs.cli --function build_parser --prog cowfs \
    --project-name cowfs --version "$version" --manual-title "cowfs manual" \
    --description "a copy-on-write overlay filesystem (FUSE)" --include "$examples" \
    --output "$share/man/man1/cowfs.1"
