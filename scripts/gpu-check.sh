#!/usr/bin/env bash
# On the device machine, after the kit is in /root/gk (scripts/gpu-kit.sh). Two checks, one per
# device call (each fits one call's time limit):
#   raw     the multistyle26 model on CUDA, fp32 (the default file) against the fp16 variant and
#           against pinned-memory IoBinding (`bound`, what inference.cuda.pinned_io does): raw
#           images/s per size and batch in alternating rounds, and the fp16 output's worst PSNR
#           against fp32 as cuDNN computes it. Writes $OUT/gpu-check.md.
#   worker  end-to-end `kiln worker` images/s on CUDA against raw ONNX Runtime at the same size and
#           batch, in alternating rounds (benches/worker_throughput.rs), through a RabbitMQ and a
#           Redis started from the kit (scripts/services-start.sh; that machine has neither), and
#           the batching gain the worker captures. Writes $OUT/gpu-worker-check.md.
#   bash scripts/gpu-check.sh raw|worker [extra worker_throughput arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: gpu-check.sh raw|worker [worker_throughput arguments]}
shift
G=${GPU_KIT:-/root/gk}
out=${OUT:-/tmp}
bash "$G/setup.sh"
# shellcheck disable=SC1091
. "$G/env.sh"
xz -d -c "$G/raw-bench.xz" > /tmp/raw-bench && chmod +x /tmp/raw-bench
export BENCH_REPO=$PWD
export KILN_INFERENCE__EXECUTION_PROVIDER=${KILN_INFERENCE__EXECUTION_PROVIDER:-cuda}
export KILN_INFERENCE__RUNTIME_LIBRARY=${KILN_INFERENCE__RUNTIME_LIBRARY:-$G/libonnxruntime.so.1.31.1}

case $mode in
  raw)
    report=$out/gpu-check.md
    args=(--raw-only --sizes "256,512" --batches "1,4,16" --rounds 3 --seconds 2 --raw-variants "fp16,bound,fp16+bound")
    ;;
  worker)
    report=$out/gpu-worker-check.md
    xz -d -c "$G/kiln.xz" > /tmp/kiln && chmod +x /tmp/kiln
    urls=$(scripts/services-start.sh "$G/services.tar.xz" /tmp/kiln-services)
    trap '/tmp/kiln-services/stop.sh' EXIT
    export BENCH_KILN=/tmp/kiln
    export KILN_AMQP__URL=${urls%% *}
    export KILN_RATE_LIMIT__REDIS_URL=${urls##* }
    args=(--sizes "256,512" --batches "1,4,16" --rounds 3 --seconds 2)
    ;;
  *) echo "unknown check: $mode (raw or worker)" >&2; exit 2 ;;
esac
{
  echo "# GPU check ($mode), $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
  echo
} > "$report"
/tmp/raw-bench "${args[@]}" "$@" 2>&1 | tee -a "$report"
cp target/bench/worker_throughput.json target/bench/raw_variants.json "$out/" 2>/dev/null || true
