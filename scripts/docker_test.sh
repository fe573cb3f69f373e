#!/usr/bin/env bash
# Build the hcgen image from this repository and check it; exits non-zero on any failure.
#
#   bash scripts/docker_test.sh
#
# Inside the image it runs the README's docker lines: `hcgen doctor`; the default command, the main job
# (`make demo`: a LeNet trained and adversarials generated from MNIST, a few minutes), with MNIST mounted
# at /data/mnist and /results mounted from a temporary folder that must then hold its summary.json;
# and the test suite (`make test`).
#
# Engine: `docker` when an engine answers `docker info`; else podman, as on machines without a Docker
# engine (shared/CONTAINER_NOTES.md): podman builds the same Dockerfile from a local debian:bookworm
# base (made here with debootstrap when podman lacks it). `podman run` cannot run there, so the image
# is exported to a folder and every command runs in it with chroot, with the image's ENV, WORKDIR and
# CMD and the same bind mounts as the docker lines.
#
# MNIST (the four *-ubyte.gz files): $HCGEN_MNIST_DIR, else ../shared/data/mnist beside this
# repository, else beside the local repository it was cloned from. $IMAGE names the image (hcgen).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
image=${IMAGE:-hcgen}

die() { echo "docker_test: $*" >&2; exit 1; }

find_mnist() {
  local origin
  if [ -n "${HCGEN_MNIST_DIR:-}" ]; then echo "$HCGEN_MNIST_DIR"; return; fi
  if [ -d "$root/../shared/data/mnist" ]; then echo "$root/../shared/data/mnist"; return; fi
  origin=$(git -C "$root" config --get remote.origin.url 2>/dev/null || true)
  if [ -n "$origin" ] && [ -d "$origin/../shared/data/mnist" ]; then echo "$origin/../shared/data/mnist"; return; fi
  die "no MNIST found; set HCGEN_MNIST_DIR to a folder with the four MNIST *-ubyte.gz files"
}
mnist=$(find_mnist)
mnist=$(cd "$mnist" && pwd)
[ -f "$mnist/t10k-images-idx3-ubyte.gz" ] || die "$mnist lacks t10k-images-idx3-ubyte.gz (and the other MNIST files)"

if docker info >/dev/null 2>&1; then
  engine=docker
elif command -v podman >/dev/null 2>&1; then
  engine=podman
  podman=(podman --cgroup-manager=cgroupfs)
else
  die "neither a Docker engine (docker info fails) nor podman; on Debian: apt-get install podman debootstrap"
fi

tmp=$(mktemp -d /var/tmp/hcgen-docker-test.XXXXXX)
results="$tmp/results"
rootfs="$tmp/rootfs"
mkdir -p "$results" "$rootfs"

mounts_under() { awk -v p="$1/" 'index($5, p) == 1 {print $5}' /proc/self/mountinfo | sort -r; }
unmount_under() {  # every mount below $1, deepest first (stacked mounts need several rounds)
  local m i
  for i in 1 2 3 4; do
    for m in $(mounts_under "$1"); do umount "$m" 2>/dev/null || true; done
  done
  [ -z "$(mounts_under "$1")" ]
}
cleanup() {
  if unmount_under "$tmp"; then
    rm -rf "$tmp"
  else
    echo "docker_test: mounts remain under $tmp; not deleting it:" >&2
    mounts_under "$tmp" >&2
  fi
}
trap cleanup EXIT

step() { echo; echo "=== $* ($(date +%T))"; }

# --- build -------------------------------------------------------------------------------------------
make_podman_base() {  # debian:bookworm for podman without a registry, as close to Docker Hub's as needed
  "${podman[@]}" image exists docker.io/library/debian:bookworm && return
  command -v debootstrap >/dev/null || die "podman has no debian:bookworm and debootstrap is missing: apt-get install debootstrap"
  step "making the debian:bookworm base with debootstrap"
  local base="$tmp/base"
  debootstrap --variant=minbase bookworm "$base" http://deb.debian.org/debian > "$tmp/debootstrap.log" 2>&1 ||
    { tail -n 20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
  unmount_under "$base" || die "debootstrap left mounts under $base"
  rm -f "$base/etc/apt/sources.list"
  cat > "$base/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  rm -rf "$base"/var/cache/apt/archives/*.deb "$base"/var/lib/apt/lists/*
  tar -C "$base" -c . | "${podman[@]}" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - docker.io/library/debian:bookworm >/dev/null
  rm -rf "$base"
}

SECONDS=0
if [ "$engine" = docker ]; then
  step "docker build -t $image ."
  docker build -t "$image" "$root"
  size=$(docker image inspect --format '{{.Size}}' "$image")
else
  make_podman_base
  # pip in the build trusts the host's CA bundle (for machines behind a TLS-intercepting proxy) via a
  # user pip.conf in a host folder mounted over /root during the build only: /root exists in the base,
  # so no mount point is left in the image, and the pip cache stays out of the layers too.
  trust=()
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    mkdir -p "$tmp/build-home/.config/pip"
    cp /etc/ssl/certs/ca-certificates.crt "$tmp/build-home/.config/pip/host-ca.crt"
    printf '[global]\ncert = /root/.config/pip/host-ca.crt\n' > "$tmp/build-home/.config/pip/pip.conf"
    trust=(-v "$tmp/build-home:/root")
  fi
  step "podman build -t localhost/$image ."
  "${podman[@]}" build --pull=never --network host --isolation chroot "${trust[@]}" -t "localhost/$image" "$root"
  size=$("${podman[@]}" image inspect --format '{{.Size}}' "localhost/$image")
  step "exporting the image to $rootfs"
  cid=$("${podman[@]}" create "localhost/$image")
  "${podman[@]}" export "$cid" | tar -x -C "$rootfs" || { "${podman[@]}" rm "$cid" >/dev/null; die "export failed"; }
  "${podman[@]}" rm "$cid" >/dev/null
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"  # docker run's default network is the host's
  mapfile -t image_env < <("${podman[@]}" image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "localhost/$image" | sed '/^$/d')
  mapfile -t image_cmd < <("${podman[@]}" image inspect --format '{{range .Config.Cmd}}{{println .}}{{end}}' "localhost/$image" | sed '/^$/d')
  workdir=$("${podman[@]}" image inspect --format '{{.Config.WorkingDir}}' "localhost/$image")
fi
build_seconds=$SECONDS
echo "docker_test: image built in ${build_seconds}s, $((size / 1000000)) MB"

# --- run ---------------------------------------------------------------------------------------------
# run_image [-v HOST:CONTAINER[:ro]]... IMAGE [CMD...]: `docker run --rm`, or its chroot equivalent.
run_image() {
  if [ "$engine" = docker ]; then docker run --rm "$@"; return; fi
  local vols=() spec src dst opt status=0
  while [ "$1" = -v ]; do vols+=("$2"); shift 2; done
  shift  # the image: already exported to $rootfs
  [ $# -gt 0 ] || set -- "${image_cmd[@]}"
  mount --bind /proc "$rootfs/proc"
  mount --rbind /dev "$rootfs/dev" && mount --make-rslave "$rootfs/dev"
  mount --bind /sys "$rootfs/sys"
  for spec in ${vols[@]+"${vols[@]}"}; do
    IFS=: read -r src dst opt <<< "$spec"
    case $(realpath -m "$rootfs$dst") in "$rootfs"/*) ;; *) die "$dst leaves the image's folder";; esac
    mkdir -p "$rootfs$dst"
    mount --bind "$src" "$rootfs$dst"
    [ "$opt" != ro ] || mount -o remount,bind,ro "$rootfs$dst"
  done
  chroot "$rootfs" /usr/bin/env -i HOME=/root "${image_env[@]}" \
    /bin/sh -c 'cd "$0" && exec "$@"' "${workdir:-/}" "$@" || status=$?
  unmount_under "$rootfs" || die "could not unmount everything under $rootfs"
  return $status
}

SECONDS=0
step "hcgen doctor"
run_image "$image" hcgen doctor
step "the main job: the default command (make demo), MNIST in, results out"
run_image -v "$results:/results" -v "$mnist:/data/mnist:ro" "$image"
summary="$results/demo/adversarial_lmdb/summary.json"
[ -s "$summary" ] || die "the main job wrote no $summary into the results mount"
echo "docker_test: results/demo/adversarial_lmdb/summary.json: $(tr -d ' \n' < "$summary" | cut -c1-200)..."
step "make test"
run_image -v "$mnist:/data/mnist:ro" "$image" make test
echo
echo "docker_test: all passed ($engine; build ${build_seconds}s, checks ${SECONDS}s, image $((size / 1000000)) MB)"
