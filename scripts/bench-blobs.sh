#!/usr/bin/env bash
# Upload and download throughput of one large blob through a broker on loopback, with the local
# backend and, when an `s3s-fs` binary is on PATH (cargo install s3s-fs --features binary), with
# an S3 backend where bytes go by presigned URL. Usage: scripts/bench-blobs.sh [SIZE_MB]
set -euo pipefail
size_mb=${1:-100}
cq=${CQ:-target/release/cq}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
head -c "${size_mb}M" /dev/urandom > "$work/blob"
sha=$(sha256sum "$work/blob" | cut -d' ' -f1)

start_broker() { # name, extra broker args...; sets $url
  "$cq" --log warn broker --listen 127.0.0.1:0 --data-dir "$work/data-$1" "${@:2}" > "$work/url-$1" &
  until [ -s "$work/url-$1" ]; do sleep 0.1; done
  url=$(sed -n 's/^listening on //p' "$work/url-$1")
}

measure() { # name url
  local t0 t1 t2
  t0=$(date +%s.%N)
  "$cq" submit --url "$2" --image busybox --input "blob=@$work/blob" -- true > /dev/null
  t1=$(date +%s.%N)
  curl -sfL -o "$work/back" "$2/f/$sha"
  t2=$(date +%s.%N)
  cmp -s "$work/blob" "$work/back" || { echo "$1: downloaded bytes differ" >&2; exit 1; }
  awk -v n="$1" -v s="$size_mb" -v a="$t0" -v b="$t1" -v c="$t2" \
    'BEGIN { printf "%-6s upload (hash + send + verify) %6.2f s  %7.1f MB/s   download %6.2f s  %7.1f MB/s\n", n, b-a, s/(b-a), c-b, s/(c-b) }'
  rm -f "$work/back"
}

echo "blob of ${size_mb} MB, broker and clients on loopback"
start_broker local
measure local "$url"
if command -v s3s-fs > /dev/null; then
  mkdir -p "$work/s3/bench"
  port=$((20000 + RANDOM % 20000))
  s3s-fs --host 127.0.0.1 --port "$port" --access-key bench --secret-key bench-secret "$work/s3" > /dev/null 2>&1 &
  until curl -s -o /dev/null "http://127.0.0.1:$port/"; do sleep 0.1; done
  AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret start_broker s3 \
    --s3-bucket bench --s3-endpoint "http://127.0.0.1:$port"
  measure s3 "$url"
else
  echo "(s3s-fs not on PATH: S3 backend skipped)"
fi
