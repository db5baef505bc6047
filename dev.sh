#!/usr/bin/env bash
# The README's two commands on a fresh Debian machine:
#   ./dev.sh up     set everything up, then run the service (training the default bundle first if missing)
#   ./dev.sh test   set everything up, then run the test suite
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
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test,bench,dev]'
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

case "${1:-}" in
  up)    shift; setup; exec "$VENV/bin/coinserve" up "$@" ;;
  test)  shift; setup; ensure_browser; ensure_redis; exec "$VENV/bin/python" -m pytest "$@" ;;
  setup) setup ;;
  *)     echo "usage: ./dev.sh up [coinserve up flags] | ./dev.sh test [pytest args] | ./dev.sh setup" >&2; exit 2 ;;
esac
