#!/bin/bash
# Runs every ```sh block of docker/README.md, in order, each with `bash -e`, in the current
# directory (test.sh: a scratch copy of the build context), against the test's own Docker daemon.
#
#   readme-test.sh README.md DOCKER_CLI SOCKET
#
# What differs from a user's shell, and why: `docker` talks to the test's daemon (SOCKET);
# `docker build` and `docker run` get `--network host` (that daemon has no bridge network);
# `-it` becomes `-i` (no terminal here). test.sh has tagged the locally made base image as
# debian:bookworm-slim in that daemon, so the Dockerfile's default base needs no registry.
set -euo pipefail
readme=$1
export README_DOCKER_CLI=$2 README_DOCKER_SOCK=$3

blocks=$(mktemp -d)
trap 'rm -rf "$blocks"' EXIT
awk -v dir="$blocks" '
    /^```sh$/ { n++; inside = 1; file = sprintf("%s/%02d.sh", dir, n); next }
    /^```/    { inside = 0; next }
    inside    { print > file }
' "$readme"

prelude='
docker() {
    local sub=$1; shift
    local args=() a
    for a in "$@"; do
        case $a in -it|-ti) args+=(-i) ;; *) args+=("$a") ;; esac
    done
    case $sub in
        build|run) "$README_DOCKER_CLI" -H "unix://$README_DOCKER_SOCK" "$sub" --network host "${args[@]}" ;;
        *) "$README_DOCKER_CLI" -H "unix://$README_DOCKER_SOCK" "$sub" "${args[@]}" ;;
    esac
}
'
count=0
for block in "$blocks"/*.sh; do
    count=$((count + 1))
    echo "== docker/README.md, sh block $count:"
    sed 's/^/   | /' "$block"
    { echo "$prelude"; cat "$block"; } >"$block.run"
    if ! bash -e "$block.run" </dev/null; then
        echo "docker/README.md: sh block $count failed"; exit 1
    fi
done
[[ $count -gt 0 ]] || { echo "docker/README.md: no sh block found"; exit 1; }
echo "docker/README.md: all $count sh blocks ran"
