#!/usr/bin/env bash
# kiln's rate limiter vs the same Redis's ceiling (redis-benchmark, same script) and PING; with
# --cluster, also the limiter on a local Redis Cluster (scripts/redis-cluster.sh, started and
# stopped here) vs the single Redis, in the same rounds.
#   scripts/bench-limiter.sh [--cluster] [--concurrency 16] [--seconds 5] [--rounds 3]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
args=()
cluster=""
for a in "$@"; do
  if [ "$a" = "--cluster" ]; then cluster=1; else args+=("$a"); fi
done
cargo build --release --bench limiter
if [ -n "$cluster" ]; then
  dir=$(mktemp -d /tmp/kiln-bench-redis-cluster.XXXXXX)
  trap 'scripts/redis-cluster.sh stop "$dir"' EXIT
  urls=$(scripts/redis-cluster.sh start "$dir")
  args+=(--cluster "$urls")
fi
cargo bench --bench limiter -- "${args[@]}"
