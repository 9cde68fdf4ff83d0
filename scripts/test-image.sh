#!/usr/bin/env bash
# Builds the local test image `cq-test/busybox:latest` without a registry: busybox-static from
# Debian's packages, its applets linked into a root filesystem, imported with `docker import`.
# Idempotent; the worker tests and `cq dev` demos use this image.
set -euo pipefail
image=${CQ_TEST_IMAGE:-cq-test/busybox:latest}
if docker image inspect "$image" > /dev/null 2>&1; then
  echo "$image is present"
  exit 0
fi
busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! file -L "$busybox" 2>/dev/null | grep -q static; then
  if [ -x /bin/busybox ] && ldd /bin/busybox 2>&1 | grep -q "not a dynamic"; then
    busybox=/bin/busybox
  else
    export DEBIAN_FRONTEND=noninteractive
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    $sudo_cmd apt-get install -y -qq busybox-static > /dev/null
    busybox=/bin/busybox
  fi
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp" "$root/etc" "$root/root"
chmod 1777 "$root/tmp"
cp "$busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'nobody:x:65534:65534:nobody:/:/bin/false' >> "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/bin' --change 'CMD ["sh"]' --change 'WORKDIR /' - "$image" > /dev/null
echo "built $image"
