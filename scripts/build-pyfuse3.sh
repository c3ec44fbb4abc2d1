#!/usr/bin/env bash
# Builds pyfuse3 from its pinned source distribution with the patches in patches/pyfuse3/ applied
# (in file-name order) and installs it into the virtualenv of PYTHON. `make setup` runs it.
#
#   scripts/build-pyfuse3.sh .venv/bin/python
#
# Skips the build when that pyfuse3 is already installed with the same patches (a hash of them is
# kept next to the interpreter). COWFS_STOCK_PYFUSE3=1 installs the release without the patches:
# cowfs detects the missing capabilities at run time and works without them, only slower.
set -euo pipefail

PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24

python=${1:?usage: $0 VENV_PYTHON}
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
patches=("$top"/patches/pyfuse3/*.patch)
stamp="$(dirname "$python")/../.pyfuse3-build"

if [[ ${COWFS_STOCK_PYFUSE3:-} == 1 ]]; then
    patches=()
fi
want="pyfuse3 $PYFUSE3_VERSION; patches: $(cat /dev/null "${patches[@]}" | sha256sum | cut -d' ' -f1) (${#patches[@]})"
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] \
        && "$python" -c "import pyfuse3, sys; sys.exit(pyfuse3.__version__ != '$PYFUSE3_VERSION')" 2>/dev/null; then
    exit 0
fi

for tool in patch pkg-config; do
    command -v "$tool" >/dev/null || { echo "build-pyfuse3: '$tool' is missing (make setup installs it)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "Building pyfuse3 $PYFUSE3_VERSION from source with ${#patches[@]} patch(es) from patches/pyfuse3/"
"$python" -m pip download --quiet --no-deps --no-binary pyfuse3 "pyfuse3==$PYFUSE3_VERSION" -d "$work"
sdist="$work/pyfuse3-$PYFUSE3_VERSION.tar.gz"
if [[ "$(sha256sum "$sdist" | cut -d' ' -f1)" != "$PYFUSE3_SHA256" ]]; then
    echo "build-pyfuse3: $sdist does not have the pinned sha256 $PYFUSE3_SHA256" >&2
    exit 1
fi
tar -xzf "$sdist" -C "$work"
for p in "${patches[@]}"; do
    echo "  applying $(basename "$p")"
    patch --quiet --forward -p1 -d "$work/pyfuse3-$PYFUSE3_VERSION" <"$p"
done
"$python" -m pip install --quiet --no-deps --force-reinstall "$work/pyfuse3-$PYFUSE3_VERSION"
echo "$want" >"$stamp"
