#!/usr/bin/env bash
# The README's two commands on a fresh Debian machine:
#   ./dev.sh up     set everything up, then run the service (training the default bundle first if missing)
#   ./dev.sh test   set everything up, then run the test suite
#   ./dev.sh image        build the container image localhost/coinserve:dev with podman (docs/containers.md)
#   ./dev.sh test-image   build it, run it as the manifests do and check that it answers (deploy/podman/check.py)
# Set-up is idempotent: a Python virtual environment in .venv with the project installed,
# and the Fashion-MNIST dataset (Debian package dataset-fashion-mnist, or $COINSERVE_DATA).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${COINSERVE_VENV:-.venv}
DATA_DIR=${COINSERVE_DATA:-/usr/share/datasets/fashion-mnist}

say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
  is_root || die "missing Debian packages: $*; run as root: apt-get install -y $*"
  say "apt-get install $*"
  if [ -z "${_APT_UPDATED:-}" ]; then apt-get update -qq; _APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_python() {
  command -v python3 >/dev/null || apt_install python3 python3-venv
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python 3.11 or newer is required"
  python3 -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv
}

ensure_dataset() {
  [ -f "$DATA_DIR/t10k-images-idx3-ubyte.gz" ] && return
  if [ -n "${COINSERVE_DATA:-}" ]; then
    die "COINSERVE_DATA=$COINSERVE_DATA holds no Fashion-MNIST IDX files (t10k-images-idx3-ubyte.gz, ...)"
  fi
  is_root || die "Fashion-MNIST is missing: run as root 'apt-get install -y dataset-fashion-mnist', or set COINSERVE_DATA"
  apt_install dataset-fashion-mnist
}

ensure_venv() {
  [ -x "$VENV/bin/python" ] || { say "creating $VENV"; python3 -m venv "$VENV"; }
  local stamp
  stamp=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [ "$(cat "$VENV/.coinserve-installed" 2>/dev/null)" != "$stamp" ]; then
    say "installing coinserve and its dependencies into $VENV (first run: about a minute)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile -e '.[test,bench,dev]'
    # byte-compile on every core (pip compiles on one: half the set-up's time on 2 cores); a file
    # some package ships for another Python version fails to compile and is skipped, as pip skips it
    "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
    echo "$stamp" > "$VENV/.coinserve-installed"
  fi
}

# The browser tests (tests/integration/test_browser.py) drive Debian's headless Chromium with selenium.
ensure_browser() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return
  apt_install chromium chromium-driver
}

# The shared-event-log tests (tests/integration/test_redis_streams.py) start Debian's redis-server.
ensure_redis() {
  command -v redis-server >/dev/null && return
  apt_install redis-server
}

setup() { ensure_python; ensure_dataset; ensure_venv; }

# ---- the container image (issue 30): podman as root, configured for VMs like the reference machine ----
PODMAN_DIR=${COINSERVE_PODMAN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/coinserve/podman}
IMAGE=${COINSERVE_IMAGE:-localhost/coinserve:dev}
DEBIAN_BASE=localhost/coinserve-base:bookworm
OFFICIAL_BASE=docker.io/library/python:3.11-slim-bookworm

_stage_t0=0
stage() { _stage_t0=$SECONDS; say "$*"; }
stage_done() { say "$1: $((SECONDS - _stage_t0)) s"; }

# crun 1.8 refuses a hybrid cgroup layout (runc works), and such VMs refuse to raise hard limits, so
# podman's default ulimits fail; storage and config live in the cache, apart from the machine's own.
ensure_podman() {
  local missing=() pair
  for pair in podman:podman buildah:buildah runc:runc mmdebstrap:mmdebstrap newuidmap:uidmap fuse-overlayfs:fuse-overlayfs; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
  is_root || die "the image is built with podman as root: run sudo ./dev.sh $1"
  mkdir -p "$PODMAN_DIR"
  printf '%s\n' '[containers]' 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]' \
    '[engine]' 'runtime = "runc"' > "$PODMAN_DIR/containers.conf"
  printf '%s\n' '[storage]' 'driver = "overlay"' "runroot = \"$PODMAN_DIR/run\"" \
    "graphroot = \"$PODMAN_DIR/storage\"" > "$PODMAN_DIR/storage.conf"
  export CONTAINERS_CONF=$PODMAN_DIR/containers.conf CONTAINERS_STORAGE_CONF=$PODMAN_DIR/storage.conf
}

# The official python image when a registry answers, else the same Debian 12 made from Debian's packages
# (with this machine's apt sources). Prints the image's name.
base_image() {
  local image rootfs
  if [ -n "${COINSERVE_BASE_IMAGE:-}" ]; then echo "$COINSERVE_BASE_IMAGE"; return; fi
  for image in "$OFFICIAL_BASE" "$DEBIAN_BASE"; do
    if podman image exists "$image"; then echo "$image"; return; fi
  done
  stage "pulling $OFFICIAL_BASE"
  if timeout 60 podman pull -q "$OFFICIAL_BASE" >/dev/null 2>&1; then
    stage_done "base image pulled"; echo "$OFFICIAL_BASE"; return
  fi
  say "no registry answers ($((SECONDS - _stage_t0)) s)"
  stage "making $DEBIAN_BASE from Debian packages (mmdebstrap, this machine's apt sources)"
  rootfs=$(mktemp -d)
  mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates,netbase,passwd bookworm "$rootfs/rootfs.tar" >&2
  podman import --quiet --change 'CMD ["python3"]' "$rootfs/rootfs.tar" "$DEBIAN_BASE" >/dev/null
  rm -rf "$rootfs"
  stage_done "base image made"
  echo "$DEBIAN_BASE"
}

pip_setting() {  # $1: pip's environment variable, $2: its key in pip's configuration
  if [ -n "${!1:-}" ]; then echo "${!1}"; else python3 -m pip config get "global.$2" 2>/dev/null || true; fi
}

# This machine's pip settings (a local folder of wheels, a proxy's CA bundle, a mirror) become the
# build's, bind-mounted for the build steps only: nothing of them stays in the image. One word a line.
pip_build_args() {
  local cert index dir i=0 links=()
  cert=$(pip_setting PIP_CERT cert)
  index=$(pip_setting PIP_INDEX_URL index-url)
  if [ -f "$cert" ]; then printf '%s\n' -v "$cert:/mnt/pip/ca.pem:ro" --build-arg PIP_CERT=/mnt/pip/ca.pem; fi
  if [ -n "$index" ]; then printf '%s\n' --build-arg "PIP_INDEX_URL=$index"; fi
  for dir in $(pip_setting PIP_FIND_LINKS find-links); do
    [ -d "$dir" ] || continue
    printf '%s\n' -v "$dir:/mnt/pip/links-$i:ro"
    links+=("/mnt/pip/links-$i")
    i=$((i + 1))
    # the CPU wheel of torch is in that folder: take it there rather than from PyTorch's index
    if compgen -G "$dir/torch-2.13.0+cpu-*.whl" >/dev/null; then
      printf '%s\n' --build-arg "TORCH_INDEX_URL=${index:-https://pypi.org/simple}"
    fi
  done
  if [ ${#links[@]} -gt 0 ]; then printf '%s\n' --build-arg "PIP_FIND_LINKS=${links[*]}"; fi
}

build_image() {
  ensure_podman image
  local base source=train args=()
  base=$(base_image)
  # a bundle trained here already (./dev.sh up) saves the build its ~8 minutes of training;
  # COINSERVE_IMAGE_TRAIN=1 trains in the build as a plain `docker build .` does
  if [ -f bundles/default/manifest.json ] && [ -z "${COINSERVE_IMAGE_TRAIN:-}" ]; then source=context; fi
  mapfile -t args < <(pip_build_args)
  stage "building $IMAGE (base $base, bundle: $source; log: $PODMAN_DIR/build.log)"
  podman build --layers --build-arg BASE_IMAGE="$base" --build-arg BUNDLE_SOURCE="$source" "${args[@]}" \
    -t "$IMAGE" . > "$PODMAN_DIR/build.log" 2>&1 || { tail -n 30 "$PODMAN_DIR/build.log" >&2; die "podman build failed (log: $PODMAN_DIR/build.log)"; }
  stage_done "image built"
}

case "${1:-}" in
  up)    shift; setup; exec "$VENV/bin/coinserve" up "$@" ;;
  test)  shift; setup; ensure_browser; ensure_redis; exec "$VENV/bin/python" -m pytest "$@" ;;
  setup) setup ;;
  image) build_image ;;
  test-image) shift; setup; build_image; exec "$VENV/bin/python" deploy/podman/check.py --image "$IMAGE" "$@" ;;
  *)     echo "usage: ./dev.sh up [coinserve up flags] | ./dev.sh test [pytest args] | ./dev.sh setup | ./dev.sh image | ./dev.sh test-image" >&2; exit 2 ;;
esac
