#!/usr/bin/env bash
# The one entry point on a fresh Debian 12 machine: installs what `make` needs (make, python3,
# compilers, Caffe's build dependencies), then runs `make TARGET...` in the repository root.
#   bash scripts/bootstrap.sh demo   # set up, build Caffe (cached), run the default job
#   bash scripts/bootstrap.sh test   # set up, build Caffe (cached), run the test suite
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/apt_install.sh"
exec make -C "$root" "${@:-demo}"
