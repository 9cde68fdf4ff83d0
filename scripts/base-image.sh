#!/usr/bin/env bash
# Builds the local base image `cq-test/debian:<codename>` without a registry: a minimal Debian
# root filesystem made by debootstrap from the machine's apt mirror, with CA certificates, and
# imported with `docker import`. The image tests build docker/broker.Dockerfile and
# docker/worker.Dockerfile on it. The codename is this machine's own (so a cq binary built here
# runs in it), or bookworm on a machine that is not Debian. Idempotent; prints the image name.
#   scripts/base-image.sh            # builds it if missing, prints e.g. cq-test/debian:bookworm
set -euo pipefail

codename=bookworm
if [ -r /etc/os-release ] && . /etc/os-release && [ "${ID:-}" = debian ] && [ -n "${VERSION_CODENAME:-}" ]; then
  codename=$VERSION_CODENAME
fi
image=${CQ_BASE_IMAGE:-cq-test/debian:$codename}
if docker image inspect "$image" > /dev/null 2>&1; then
  echo "$image"
  exit 0
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo > /dev/null 2>&1 && sudo -n true 2> /dev/null; then sudo "$@"
  else
    echo "error: building $image needs root (debootstrap). Run once: sudo scripts/base-image.sh" >&2
    exit 1
  fi
}

if ! command -v debootstrap > /dev/null 2>&1; then
  echo "installing debootstrap (apt)" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap > /dev/null
fi

# The mirror this machine's apt already uses, so no other host has to be reachable.
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/\?$/\1/p' /etc/apt/sources.list.d/*.sources 2> /dev/null | head -n 1)
[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /^http/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2> /dev/null || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian

root=$(mktemp -d -t cq-base-image.XXXXXX)
trap 'as_root rm -rf "$root"' EXIT
echo "building $image: debootstrap $codename from $mirror (a minute or two, once)" >&2
if ! as_root debootstrap --variant=minbase --include=ca-certificates "$codename" "$root" "$mirror" > "$root.log" 2>&1; then
  tail -n 20 "$root.log" >&2
  echo "error: debootstrap failed (full log: $root.log)" >&2
  exit 1
fi
rm -f "$root.log"
as_root sh -c "rm -rf '$root'/var/cache/apt/archives/*.deb '$root'/var/lib/apt/lists/*"
as_root tar -C "$root" -c . | docker import --change 'CMD ["bash"]' - "$image" > /dev/null
echo "built $image" >&2
echo "$image"
