#!/bin/bash
# Runs inside the cowfs image (docker run --device /dev/fuse --cap-add SYS_ADMIN ...): a layered
# workspace from an imported OCI layer, changes through the mount, diff, export, commit, run, the
# Python API, and pytest with the cowfs plugin. Every step must succeed; the last line says so.
set -euo pipefail
step() { printf '\n== %s\n' "$*"; }

work=$(mktemp -d /tmp/cowfs-smoke.XXXXXX)
cleanup() {
    cowfs umount "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
mkdir -p base/etc base/data upper mnt
echo "base config" > base/etc/app.conf
echo "1,2,3" > base/data/table.csv
echo "old" > base/data/obsolete

step "an OCI layer (as from docker save) imported as a second lower"
mkdir -p layer-src/etc layer-src/data
echo "layer config" > layer-src/etc/app.conf
touch layer-src/data/.wh.obsolete          # the OCI whiteout of data/obsolete
tar -C layer-src -cf layer.tar .
cowfs import layer.tar layer1
getfattr -n user.overlay.whiteout layer1/data/obsolete

step "mount layer1:base with a writable upper"
cowfs mount layer1:base upper mnt
test "$(cat mnt/etc/app.conf)" = "layer config"
test ! -e mnt/data/obsolete
echo "4,5,6" >> mnt/data/table.csv
echo "new" > mnt/data/added
cowfs status
cowfs diff mnt | tee diff.txt
grep -qx 'M  data/table.csv' diff.txt
grep -qx 'A  data/added' diff.txt
cowfs umount mnt

step "export the upper as a layer and stack it"
cowfs export --lower layer1:base upper -o upper.tar.gz
cowfs import upper.tar.gz layer2
mkdir upper2
cowfs mount layer2:layer1:base upper2 mnt
test "$(cat mnt/data/added)" = "new"
cowfs umount mnt

step "commit into a copy of the base"
cp -a base committed
cowfs reset upper --yes
test -z "$(cowfs diff upper)"
# A new upper: 'upper' remembers the stack it was made on (layer1:base) and refuses another.
mkdir upper3
cowfs mount committed upper3 mnt
echo "committed" > mnt/data/added
rm mnt/data/obsolete
cowfs umount mnt
cowfs commit upper3 --into committed --yes
test "$(cat committed/data/added)" = "committed"
test ! -e committed/data/obsolete

step "cowfs run: a disposable view"
cowfs run base -- sh -c 'echo scribble > etc/app.conf; rm -r data'
test "$(cat base/etc/app.conf)" = "base config"
test -e base/data/table.csv

step "the Python API"
python3 - "$work/base" <<'PY'
import sys, cowfs
with cowfs.overlay(sys.argv[1]) as view:
    (view.path / "etc" / "app.conf").write_text("api")
    print(view.summary())
    assert view.summary() == "1 modified"
PY

step "pyfuse3 is the patched build (patches/pyfuse3/)"
python3 -c 'from cowfs import operations as o; assert o.can_cache_listings() and o.kernel_can_open_dirs(), "stock pyfuse3"'

step "pytest and the cowfs plugin are installed"
python3 -c 'import pytest, cowfs.pytest_plugin'
pytest --version
pytest --help >pytest-help.txt
grep -q cowfs_dataset pytest-help.txt

printf '\ncowfs smoke test: OK\n'
