#!/usr/bin/env bash
# On the device machine, after the kit is in /root/gk (scripts/gpu-kit.sh): the multistyle26 model
# on CUDA, fp32 (the default file) against the fp16 variant and against pinned-memory IoBinding
# (`bound`, what inference.cuda.pinned_io does), raw images/s per size
# and batch in alternating rounds, and the fp16 output's worst PSNR against fp32 as cuDNN computes
# it. Writes $OUT/gpu-check.md (and the JSON) so the tables come back.
#   bash scripts/gpu-check.sh [extra worker_throughput arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
G=${KILN_GPU_KIT:-/root/gk}
out=${OUT:-/tmp}
bash "$G/setup.sh"
# shellcheck disable=SC1091
. "$G/env.sh"
xz -d -c "$G/raw-bench.xz" > /tmp/raw-bench
chmod +x /tmp/raw-bench
{
  echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  echo
} > "$out/gpu-check.md"
BENCH_REPO=$PWD \
KILN_INFERENCE__EXECUTION_PROVIDER=${KILN_INFERENCE__EXECUTION_PROVIDER:-cuda} \
KILN_INFERENCE__RUNTIME_LIBRARY=${KILN_INFERENCE__RUNTIME_LIBRARY:-$G/libonnxruntime.so.1.31.1} \
  /tmp/raw-bench --raw-only --sizes 256,512 --batches 1,4,16 --rounds 3 --seconds 2 --raw-variants fp16,bound,fp16+bound "$@" \
  2>&1 | tee -a "$out/gpu-check.md"
cp target/bench/raw_variants.json "$out/" 2>/dev/null || true
