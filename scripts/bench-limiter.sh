#!/usr/bin/env bash
# kiln's rate limiter vs the same Redis's ceiling (redis-benchmark, same script) and PING.
#   scripts/bench-limiter.sh [--concurrency 16] [--seconds 5] [--rounds 3]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
cargo bench --bench limiter -- "$@"
