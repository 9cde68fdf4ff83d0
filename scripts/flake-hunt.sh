#!/usr/bin/env bash
# Runs the whole test suite N times in a row (default 20) through scripts/test.sh and prints,
# for every test that failed at least once, how many runs it failed in. Exits non-zero when any
# run failed. Each run's full output is kept in a temporary directory named at the end.
#   scripts/flake-hunt.sh 20
#   scripts/flake-hunt.sh 5 -p cq-broker      # further arguments go to cargo test
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
shift || true
case "$runs" in '' | *[!0-9]*) echo "usage: scripts/flake-hunt.sh [N] [cargo test args...]" >&2; exit 2 ;; esac
out=$(mktemp -d -t cq-flake-hunt.XXXXXX)

# Build once, so the first run's time is not the build's.
scripts/test.sh --no-run "$@" > "$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }

failed_runs=0
for i in $(seq 1 "$runs"); do
  start=$(date +%s)
  if scripts/test.sh "$@" > "$out/run-$i.log" 2>&1; then status=ok; else status=FAILED; failed_runs=$((failed_runs + 1)); fi
  passed=$(grep -ho '^test result: [a-zA-Z]*\. [0-9]* passed' "$out/run-$i.log" | awk '{s += $4} END {print s + 0}')
  printf 'run %d/%d: %s, %d tests passed, %ds\n' "$i" "$runs" "$status" "$passed" $(( $(date +%s) - start ))
done

echo
echo "$runs runs, $failed_runs failed"
# libtest prints `test path::name ... FAILED` for every failing test.
failures=$(grep -h '^test .* \.\.\. FAILED$' "$out"/run-*.log | sed 's/^test \(.*\) \.\.\. FAILED$/\1/' | sort | uniq -c | sort -rn)
if [ -n "$failures" ]; then
  echo "failures per test (runs failed, test):"
  echo "$failures"
fi
# A test binary that crashed or timed out prints no such line; name the runs instead.
for i in $(seq 1 "$runs"); do
  if ! grep -q '^test result' "$out/run-$i.log"; then echo "run $i printed no test result (see $out/run-$i.log)"; fi
done
echo "logs: $out"
[ "$failed_runs" -eq 0 ]
