#!/usr/bin/env bash
# Run pytest as a plain user (uid/gid 65534 by default), from root: `make test` runs the mount
# tests a second time this way (issue 9: rootless use must work).
#
#   scripts/test-as-user.sh PYTHON [PYTEST_ARGS...]
#
# What a plain user needs, set up here and restored on exit (trap), whatever happens:
# - /dev/fuse readable and writable by others (these machines ship it 0600; Debian's default is
#   0666): chmod 0666, then back to its mode.
# - search permission (o+x, never read) on every directory above the project, the venv's
#   interpreter (a symlink into /root/.pyenv here) and its standard library: each one that lacks
#   it gets it, and gets its mode back afterwards.
# - a writable home and working directory: a fresh temporary directory, removed afterwards (pytest
#   runs with -p no:cacheprovider and -c/--rootdir pointing at the project, which the user cannot
#   write).
# The user's environment is built from scratch (env -i): PATH, HOME, LANG, and PYTHONPATH, CI and
# HYPOTHESIS_PROFILE when set.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 PYTHON [PYTEST_ARGS...]" >&2
    exit 2
fi
if [[ $(id -u) -ne 0 ]]; then
    echo "$0: run as root (it sets up what the plain user needs, then drops to it)" >&2
    exit 2
fi

python=$1
shift

# One run at a time: a second run would see the first one's changes as the original state, and
# the first one's restore would pull /dev/fuse from under the second.
exec 9>/run/lock/cowfs-test-as-user.lock
flock 9
uid=${TEST_USER_UID:-65534}
gid=${TEST_USER_GID:-65534}
project=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Directories whose mode this script changed, as "MODE PATH" lines, and /dev/fuse's old mode.
changed_dirs=()
fuse_mode=""
home=""

restore() {
    local entry
    for entry in "${changed_dirs[@]}"; do
        chmod "${entry%% *}" "${entry#* }" || echo "$0: could not restore ${entry#* }" >&2
    done
    if [[ -n $fuse_mode ]]; then
        chmod "$fuse_mode" /dev/fuse || echo "$0: could not restore /dev/fuse" >&2
    fi
    if [[ -n $home ]]; then
        # rmdir of the mount points' parents only, never rm -r across a mount: the tests unmount
        # everything, and .ci/run fails on any cowfs mount left behind.
        if awk -v top="$home/" 'index($2, top) == 1 {found=1} END {exit !found}' /proc/mounts; then
            echo "$0: something is still mounted under $home; leaving it" >&2
        else
            rm -rf --one-file-system "$home"
        fi
    fi
}
trap restore EXIT

# Every ancestor of the given paths gets o+x if it lacks it.
make_searchable() {
    local path dir mode
    for path in "$@"; do
        dir=$path
        while [[ $dir != / ]]; do
            mode=$(stat -c %a "$dir")
            if (( (8#$mode & 1) == 0 )); then
                changed_dirs+=("$mode $dir")
                chmod o+x "$dir"
            fi
            dir=$(dirname "$dir")
        done
    done
}

real_python=$(readlink -f "$python")
base_prefix=$("$python" -c 'import sys; print(sys.base_prefix)')
venv_dir=$(dirname "$(dirname "$python")")
make_searchable "$project" "$(dirname "$real_python")" "$base_prefix" "$(cd "$venv_dir" && pwd)"

fuse_mode=$(stat -c %a /dev/fuse)
chmod 0666 /dev/fuse

home=$(mktemp -d /tmp/cowfs-plain-user-XXXXXX)
chown "$uid:$gid" "$home"
chmod 0700 "$home"

user_env=(PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME="$home" LANG=C.UTF-8
          PYTHONDONTWRITEBYTECODE=1 TMPDIR=/tmp)
for var in PYTHONPATH CI HYPOTHESIS_PROFILE; do
    if [[ -n ${!var:-} ]]; then user_env+=("$var=${!var}"); fi
done

# Paths of tests are taken relative to the project, as from `make test`; the run's working
# directory is the user's home.
args=()
for arg in "$@"; do
    if [[ $arg != /* && $arg != -* && -e $project/${arg%%::*} ]]; then arg=$project/$arg; fi
    args+=("$arg")
done

echo "== pytest as uid $uid (/dev/fuse 0666 for the run; made searchable: ${changed_dirs[*]:-nothing})"
status=0
(cd "$home" && setpriv --reuid="$uid" --regid="$gid" --clear-groups -- \
    env -i "${user_env[@]}" "$python" -m pytest -c "$project/pyproject.toml" \
    --rootdir "$project" -p no:cacheprovider "${args[@]}") || status=$?
exit "$status"
