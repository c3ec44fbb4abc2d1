#!/bin/bash
# make docker-test: build the cowfs image and run docker/smoke-test.sh in a container, with a
# Docker daemon of our own that leaves nothing behind.
#
# No image registry is reachable here, so the base image is made locally: debootstrap a minimal
# Debian and `docker import` it. The daemon gets its own data root, exec root and socket in a
# temporary directory, no bridge and no iptables rules; build and run use the host network.
# On exit (also on failure or Ctrl-C) the daemon is stopped and its directory removed.
#
# Environment: SUITE (default bookworm), MIRROR (default http://deb.debian.org/debian),
# DOCKERD/DOCKER (default /usr/sbin/dockerd, /usr/bin/docker), KEEP_TMP=1 to keep the directory.
set -euo pipefail

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
DOCKERD=${DOCKERD:-/usr/sbin/dockerd}
DOCKER_CLI=${DOCKER:-/usr/bin/docker}
repo=$(cd "$(dirname "$0")/.." && pwd)

if [[ $(id -u) -ne 0 ]]; then echo "docker-test: needs root (dockerd, debootstrap)"; exit 1; fi
for tool in "$DOCKERD" "$DOCKER_CLI" debootstrap; do
    command -v "$tool" >/dev/null || {
        echo "docker-test: $tool not found; install: apt-get install docker.io debootstrap"
        exit 1
    }
done
[[ -c /dev/fuse ]] || { echo "docker-test: /dev/fuse is missing"; exit 1; }

tmp=$(mktemp -d /tmp/cowfs-docker.XXXXXX)
sock="$tmp/docker.sock"
docker() { "$DOCKER_CLI" -H "unix://$sock" "$@"; }
dockerd_pid=""

cleanup() {
    status=$?
    set +e
    if [[ -n "$dockerd_pid" ]]; then
        kill -TERM "$dockerd_pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$dockerd_pid" 2>/dev/null && kill -KILL "$dockerd_pid"
        wait "$dockerd_pid" 2>/dev/null
    fi
    # Whatever the daemon left mounted under its directories (deepest first), then the files.
    findmnt -rn -o TARGET | grep -F "$tmp/" | sort -r | while read -r m; do umount -l "$m"; done
    if [[ "${KEEP_TMP:-}" == 1 ]]; then echo "docker-test: kept $tmp"; else rm -rf "$tmp"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== starting dockerd (data root $tmp/data)"
"$DOCKERD" --data-root "$tmp/data" --exec-root "$tmp/exec" --pidfile "$tmp/dockerd.pid" \
    -H "unix://$sock" --bridge=none --iptables=false --ip-masq=false \
    >"$tmp/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 150); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || { cat "$tmp/dockerd.log"; exit 1; }
    sleep 0.2
done
docker version --format 'docker {{.Server.Version}}'

echo "== base image: debootstrap $SUITE (minbase) and docker import"
debootstrap --variant=minbase "$SUITE" "$tmp/rootfs" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 \
    || { tail -20 "$tmp/debootstrap.log"; exit 1; }
tar -C "$tmp/rootfs" -c . | docker import - "cowfs-test-base:$SUITE" >/dev/null
rm -rf "$tmp/rootfs"
# The Dockerfile's default base (and docker/README.md's), served by this daemon without a registry.
docker tag "cowfs-test-base:$SUITE" "debian:$SUITE-slim"

echo "== building the cowfs image (BASE_IMAGE=cowfs-test-base:$SUITE)"
mkdir "$tmp/context"
cp -a "$repo/pyproject.toml" "$repo/README.md" "$repo/cowfs" "$repo/docker" "$repo/patches" \
    "$tmp/context/"
mkdir "$tmp/context/scripts" && cp -a "$repo/scripts/build-pyfuse3.sh" "$tmp/context/scripts/"
find "$tmp/context" -name __pycache__ -prune -exec rm -rf {} +
# The host's locally added CA certificates are trusted in the build too (a TLS-intercepting
# proxy that the host trusts must work for apt and pip inside the build).
cp /usr/local/share/ca-certificates/*.crt "$tmp/context/docker/ca-certificates/" 2>/dev/null || true
docker build --network host --build-arg "BASE_IMAGE=cowfs-test-base:$SUITE" \
    -f "$tmp/context/docker/Dockerfile" -t cowfs:test "$tmp/context"

echo "== the image: size and layers"
size() { docker image inspect -f '{{.Size}}' "$1"; }
base_size=$(size "cowfs-test-base:$SUITE")
image_size=$(size cowfs:test)
added_mb=$(( (image_size - base_size) / 1000000 ))
echo "cowfs:test is $(( image_size / 1000000 )) MB: the base $(( base_size / 1000000 )) MB + $added_mb MB"
docker history --format '{{.Size}}	{{.CreatedBy}}' cowfs:test | cut -c1-110
# docker/README.md says "about 70 MB" on top of the base; fail well before that is untrue.
[[ $added_mb -le 100 ]] || { echo "docker-test: the image adds $added_mb MB (> 100 MB)"; exit 1; }
# What the build stage needed must not be in the image.
docker run --rm --network host cowfs:test sh -c \
    'for f in /usr/bin/gcc /usr/bin/cc /usr/include/fuse3 /usr/include/python3.11 /var/lib/apt/lists/deb.debian.org_debian_dists_bookworm_InRelease; do
         if [ -e "$f" ]; then echo "docker-test: $f is in the image"; exit 1; fi; done'

echo "== without --device /dev/fuse / --cap-add SYS_ADMIN: the error names the missing flags"
expect_error() {
    local want=$1; shift
    local err
    if err=$(docker run --rm --network host "$@" cowfs:test \
                 sh -c 'mkdir -p /b /u /m && cowfs mount /b /u /m' 2>&1); then
        echo "docker-test: the mount succeeded with: $*"; exit 1
    fi
    echo "$err"
    grep -qF -- "$want" <<<"$err" || { echo "docker-test: expected '$want'"; exit 1; }
}
expect_error "(missing: --device /dev/fuse --cap-add SYS_ADMIN)"
expect_error "(missing: --cap-add SYS_ADMIN)" --device /dev/fuse
expect_error "(missing: --device /dev/fuse)" --cap-add SYS_ADMIN

echo "== smoke test in a container"
docker run --rm --network host --device /dev/fuse --cap-add SYS_ADMIN \
    cowfs:test /usr/local/share/cowfs/smoke-test.sh

echo "== the commands of docker/README.md"
(cd "$tmp/context" && bash "$repo/docker/readme-test.sh" "$repo/docker/README.md" \
    "$DOCKER_CLI" "$sock")
echo "docker-test: passed"
