#!/usr/bin/env bash
# cowfs for the users of a machine, independent of this checkout (make system-install,
# make system-uninstall):
#
#   scripts/system-install.sh install PYTHON PREFIX SBINDIR
#   scripts/system-install.sh uninstall PYTHON PREFIX SBINDIR
#
# install: a virtualenv of its own, PREFIX/lib/cowfs, made with PYTHON (>= 3.11), holding pyfuse3
# built with patches/pyfuse3/ (scripts/build-pyfuse3.sh) and cowfs installed from a copy of this
# checkout (not editable: the checkout can be moved, changed or deleted afterwards); the shell
# completion and the man page generated into it (scripts/shell-files.sh); and symlinks to it:
# PREFIX/bin/cowfs, SBINDIR/mount.fuse.cowfs (mount -t fuse.cowfs and /etc/fstab: mount(8) runs
# /sbin/mount.TYPE), PREFIX/share/{man/man1/cowfs.1, bash-completion/completions/cowfs,
# zsh/site-functions/_cowfs}. Run again, it reinstalls cowfs from this checkout into the same
# virtualenv. A symlink already there (make helper's, make shell-install's: the development form,
# which runs a checkout's .venv) is replaced; a file that is not a symlink is left alone, and said.
#
# uninstall: removes the symlinks that point into PREFIX/lib/cowfs, then the virtualenv.
#
# Needs what make install needs (gcc, the Python headers, libfuse3-dev, pkg-config, patch) and
# the Python package index (pip downloads pyfuse3's source and cowfs's dependencies).
set -euo pipefail

mode=${1:?usage: $0 install|uninstall PYTHON PREFIX SBINDIR}
python=${2:?usage: $0 install|uninstall PYTHON PREFIX SBINDIR}
prefix=${3:?usage: $0 install|uninstall PYTHON PREFIX SBINDIR}
sbindir=${4:?usage: $0 install|uninstall PYTHON PREFIX SBINDIR}
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$prefix/lib/cowfs

# What is linked where: "link target-inside-the-venv", one a line.
links() {
    echo "$prefix/bin/cowfs $venv/bin/cowfs"
    echo "$sbindir/mount.fuse.cowfs $venv/bin/mount.fuse.cowfs"
    for rel in man/man1/cowfs.1 bash-completion/completions/cowfs zsh/site-functions/_cowfs; do
        echo "$prefix/share/$rel $venv/share/$rel"
    done
}

if [[ $mode == uninstall ]]; then
    links | while read -r link target; do
        if [[ -L $link && "$(readlink "$link")" == "$target" ]]; then
            rm -f "$link" && echo "removed $link"
        fi
    done
    if [[ -f $venv/pyvenv.cfg && -f $venv/.cowfs-system-install ]]; then
        rm -rf "$venv" && echo "removed $venv"
    fi
    exit 0
fi
[[ $mode == install ]] || { echo "$0: unknown mode '$mode' (install or uninstall)" >&2; exit 2; }

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "cowfs needs Python >= 3.11; '$python' is $("$python" --version 2>&1)." >&2; exit 1; }
if [[ -e $venv && ! -f $venv/.cowfs-system-install ]]; then
    echo "$venv exists and was not made by this script; leaving it alone." >&2
    exit 1
fi
# A virtualenv whose interpreter no longer runs (its base Python was removed) is made again.
if [[ -d $venv ]] && ! "$venv/bin/python" -c '' 2>/dev/null; then rm -rf "$venv"; fi
if [[ ! -x $venv/bin/python ]]; then
    echo "Creating $venv with $("$python" --version)"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
    touch "$venv/.cowfs-system-install"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input --quiet)
bash "$top/scripts/build-pyfuse3.sh" "$venv/bin/python"

# From a copy: pip builds in the tree it is given (build/, *.egg-info), and nothing installed
# may point back to this checkout.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -a "$top/pyproject.toml" "$top/README.md" "$top/cowfs" "$src/"
find "$src" -name __pycache__ -prune -exec rm -rf {} +
"${pip[@]}" uninstall --yes cowfs-overlay 2>/dev/null || true
"${pip[@]}" install "$src"
# The completion and the man page, generated from the installed parser.
"${pip[@]}" install "shtab>=1.7" "argparse-manpage>=4.5"
bash "$top/scripts/shell-files.sh" "$venv/bin/python" "$venv/share"
echo "Installed cowfs $("$venv/bin/cowfs" --version | awk '{print $NF}') in $venv"

links | while read -r link target; do
    mkdir -p "$(dirname "$link")"
    if [[ -e $link && ! -L $link ]]; then
        echo "$link exists and is not a symlink; leaving it alone."
    elif [[ "$(readlink "$link" || true)" != "$target" ]]; then
        ln -sfn "$target" "$link"
        echo "linked $link -> $target"
    fi
done
