#!/usr/bin/env bash
# Raw ONNX Runtime vs end-to-end worker throughput (256 and 512 px, CPU), cold start, peak RSS.
#   scripts/bench.sh [--sizes 256,512] [--threads N] [--seconds S] [--rounds R]
# Prints a Markdown table; the raw numbers land in target/bench/worker_throughput.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo bench --bench worker_throughput -- "$@"
