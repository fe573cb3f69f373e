#!/usr/bin/env bash
# Build hcgen's CPU Caffe once and link it into a Python virtualenv.
#
#   bash scripts/install_caffe.sh VENV_DIR
#
# Source: the PyPI sdist brocolli-caffe==9.0.2 (checked against SDIST_SHA256), never pip-installed:
# it is unpacked, patched with patches/*.patch in name order, built with CMake into
#   ${HCGEN_CACHE:-~/.cache/hcgen}/caffe-<key>
# where <key> hashes the sdist, the patches, the recipe below and the Python/numpy ABI. A prefix
# that is complete is reused (a second run takes seconds); a failed build leaves nothing behind.
# Finally VENV_DIR gets a caffe.pth (so `import caffe` works) and bin/caffe (the CLI).
set -euo pipefail

SDIST=brocolli-caffe==9.0.2
SDIST_FILE=brocolli-caffe-9.0.2.tar.gz
SDIST_SHA256=c6410cc60bdd6db685d441b66be7df05410f8850ac88d6b75d48ef9b2315c08a
RECIPE="cmake Release CPU_ONLY USE_LMDB shared-libcaffe v1"

venv=${1:?usage: install_caffe.sh VENV_DIR}
venv=$(cd "$venv" && pwd)
py="$venv/bin/python"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${HCGEN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hcgen}
mkdir -p "$cache"

bash "$root/scripts/apt_install.sh"

abi=$("$py" -c 'import sys, numpy; print("py%d.%d-np%s" % (sys.version_info[:2] + (numpy.__version__.split(".")[0],)))')
key=$( { echo "$SDIST_SHA256 $RECIPE $abi"; cat "$root"/patches/*.patch; } | sha256sum | cut -c1-16)
prefix="$cache/caffe-$key"

link_into_venv() {
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$prefix/python" > "$site/caffe.pth"
  ln -sf "$prefix/bin/caffe" "$venv/bin/caffe"
}

exec 9>"$cache/caffe.lock"
flock 9
if [ -f "$prefix/.complete" ]; then
  link_into_venv
  echo "hcgen: using cached Caffe build $prefix"
  exit 0
fi

work=$(mktemp -d "$cache/build-$key.XXXXXX")
trap 'rm -rf "$work" "$prefix.partial"' EXIT
log="$cache/build-$key.log"

sdist="$cache/$SDIST_FILE"
if [ ! -f "$sdist" ] || ! echo "$SDIST_SHA256  $sdist" | sha256sum -c --status; then
  echo "hcgen: downloading $SDIST (sdist only; it is built, not installed)"
  "$py" -m pip download --quiet --no-deps --no-binary :all: "$SDIST" -d "$work/dl"
  mv "$work/dl/$SDIST_FILE" "$sdist"
fi
if ! echo "$SDIST_SHA256  $sdist" | sha256sum -c --status; then
  echo "hcgen: $sdist does not match sha256 $SDIST_SHA256; delete it and retry" >&2
  exit 1
fi

tar -xzf "$sdist" -C "$work"
src="$work/${SDIST_FILE%.tar.gz}"
for p in "$root"/patches/*.patch; do
  patch -d "$src" -p1 --quiet --forward < "$p" || { echo "hcgen: patch $p does not apply" >&2; exit 1; }
done

jobs=$(nproc 2>/dev/null || echo 2)
echo "hcgen: building Caffe into $prefix (a few minutes on 2 cores, once per set of patches; log: $log)"
if ! {
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_INSTALL_PREFIX="$prefix" -DPython3_EXECUTABLE="$py" &&
  make -C "$work/build" -j"$jobs" &&
  make -C "$work/build" install DESTDIR="$work/stage"
} > "$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "hcgen: the Caffe build failed; full log: $log" >&2
  exit 1
fi
# Installed with DESTDIR, then moved into place: a prefix that exists is always complete.
mv "$work/stage$prefix" "$prefix.partial"
touch "$prefix.partial/.complete"
mv "$prefix.partial" "$prefix"
link_into_venv
echo "hcgen: Caffe built: $prefix"
