#!/usr/bin/env bash
# Benchmarks cq's log on one machine, in one run, three ways: one broker with its local log (no
# NATS), one broker with its log on a 3-node NATS JetStream cluster, three brokers of one
# cluster (one owner, two standbys relaying clients and redirecting workers), the simulated
# clients and workers spread over all three, and three brokers of a cluster of 4 shards (each
# serving its share) with 4 queues. Each way runs `cq bench` twice: submit → ack latency
# at a steady rate, then full lifecycles as fast as they go. Everything listens on 127.0.0.1 and
# is stopped at the end. Needs `cargo build --release -p cq` first.
#   scripts/bench-cluster.sh                 # 10,000 jobs at 1,000/s, then 20,000 lifecycles
#   JOBS=40000 RATE=2000 scripts/bench-cluster.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cq=${CQ_BIN:-target/release/cq}
[ -x "$cq" ] || { echo "error: $cq is missing; run cargo build --release -p cq first" >&2; exit 1; }
nats_server=${CQ_NATS_SERVER:-$(scripts/nats-server.sh)}
jobs=${JOBS:-20000}
rate_jobs=${RATE_JOBS:-10000}
rate=${RATE:-1000}

dir=$(mktemp -d -t cq-bench-cluster.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

# A free port on 127.0.0.1 (bound once to find it, then released).
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits until `url`/readyz answers `want` (ready, or standby).
wait_for() {
  local url=$1 want=$2
  for _ in $(seq 1 600); do
    if curl -s "$url/readyz" | grep -q "^$want"; then return 0; fi
    sleep 0.1
  done
  echo "error: $url did not become $want" >&2
  exit 1
}

# Starts `cq broker ARGS...` on a free port; sets $url.
broker() {
  local port
  port=$(free_port)
  CQ_LOG=warn "$cq" broker --listen "127.0.0.1:$port" "$@" > /dev/null 2>> "$dir/brokers.log" &
  pids+=($!)
  url="http://127.0.0.1:$port"
}

bench() {
  echo "### $1"
  shift
  "$cq" bench --log warn --url "$1" --jobs "$rate_jobs" --rate "$rate" --workers 10 --slots 64 "${@:2}" | grep -v '^|---' | grep 'latency\|cq bench'
  "$cq" bench --log warn --url "$1" --jobs "$jobs" --workers 10 --slots 64 "${@:2}" | grep 'jobs/s\|submissions/s'
  echo
}

echo "## $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(date -u +%Y-%m-%d)"
echo

broker --data-dir "$dir/local"
wait_for "$url" ready
bench "one broker, local log (fsync always)" "$url"
kill "${pids[-1]}"

# Three NATS servers as one JetStream cluster, configured as docs/operations.md requires.
clients=() routes=()
for i in 0 1 2; do clients+=("$(free_port)"); routes+=("$(free_port)"); done
route_list="nats-route://127.0.0.1:${routes[0]}, nats-route://127.0.0.1:${routes[1]}, nats-route://127.0.0.1:${routes[2]}"
for i in 0 1 2; do
  cat > "$dir/n$i.conf" << EOF
server_name: n$i
listen: 127.0.0.1:${clients[$i]}
max_payload: 8MB
jetstream { store_dir: "$dir/n$i", sync_interval: always }
cluster { name: cqbench, listen: 127.0.0.1:${routes[$i]}, routes: [$route_list] }
EOF
  "$nats_server" -c "$dir/n$i.conf" > "$dir/n$i.log" 2>&1 &
  pids+=($!)
done
nats="nats://127.0.0.1:${clients[0]},nats://127.0.0.1:${clients[1]},nats://127.0.0.1:${clients[2]}"
cluster_broker() { broker --nats "$nats" --nats-cluster "$1" --node-id "$2" --shared-blob-dir --data-dir "$dir/$1-$2" "${@:3}"; }

cluster_broker one a
wait_for "$url" ready
bench "one broker, log on 3 NATS servers (3 replicas)" "$url"
kill "${pids[-1]}"

cluster_broker three a
wait_for "$url" ready
a=$url
cluster_broker three b
wait_for "$url" standby
b=$url
cluster_broker three c
wait_for "$url" standby
c=$url
bench "three brokers (one owner, two standbys), clients and workers spread over them" "$a,$b,$c"

# Three brokers started together on a cluster of 4 shards: each serves a share; 4 queues.
cluster_broker sharded a --shards 4
a=$url
cluster_broker sharded b --shards 4
b=$url
cluster_broker sharded c --shards 4
c=$url
for u in "$a" "$b" "$c"; do wait_for "$u" ready; done
# Until each serves its share (2, 1 and 1 in some order; a broker over it hands shards over).
served() { for u in "$a" "$b" "$c"; do curl -s "$u/readyz" | grep -c 'served here' || true; done | xargs; }
for _ in $(seq 1 600); do
  case "$(served | tr ' ' '\n' | sort | xargs)" in "1 1 2") break ;; esac
  sleep 0.1
done
echo "shards served by a, b, c: $(served)"
bench "three brokers, 4 shards (each broker serves its share), 4 queues" "$a,$b,$c" --queues 4
