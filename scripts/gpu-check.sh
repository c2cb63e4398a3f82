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
#   diffusion  a Stable Diffusion 1.5-shaped pipeline (graphs from models/tools/make_sd15_shaped.py,
#           random weights written here by models/tools/fill_random_weights.py): the UNet's step
#           time by batch at 512 px, and `kiln worker` against the raw ONNX Runtime loop at the same
#           size, steps and batch (benches/diffusion_throughput.rs), through the kit's RabbitMQ.
#           Writes $OUT/gpu-diffusion-check.md.
#   steps   step-level vs whole-request batching of that pipeline at 512 px (`kiln bench --workload
#           diffusion` in both modes, scripts/bench-step-batching.sh). Writes $OUT/gpu-steps-check.md.
#   bash scripts/gpu-check.sh raw|worker|diffusion|steps [extra benchmark arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: gpu-check.sh raw|worker|diffusion|steps [benchmark arguments]}
shift
G=${GPU_KIT:-/root/gk}
out=${OUT:-/tmp}
bash "$G/setup.sh"
# shellcheck disable=SC1091
. "$G/env.sh"
bench=/tmp/raw-bench
export BENCH_REPO=$PWD
export KILN_INFERENCE__EXECUTION_PROVIDER=${KILN_INFERENCE__EXECUTION_PROVIDER:-cuda}
export KILN_INFERENCE__RUNTIME_LIBRARY=${KILN_INFERENCE__RUNTIME_LIBRARY:-$G/libonnxruntime.so.1.31.1}

start_services() {
  xz -d -c "$G/kiln.xz" > /tmp/kiln && chmod +x /tmp/kiln
  urls=$(scripts/services-start.sh "$G/services.tar.xz" /tmp/kiln-services)
  trap '/tmp/kiln-services/stop.sh' EXIT
  export BENCH_KILN=/tmp/kiln
  export KILN_AMQP__URL=${urls%% *}
  export KILN_RATE_LIMIT__REDIS_URL=${urls##* }
}

case $mode in
  raw)
    report=$out/gpu-check.md
    args=(--raw-only --sizes "256,512" --batches "1,4,16" --rounds 3 --seconds 2 --raw-variants "fp16,bound,fp16+bound")
    ;;
  worker)
    report=$out/gpu-worker-check.md
    start_services
    args=(--sizes "256,512" --batches "1,4,16" --rounds 3 --seconds 2)
    ;;
  diffusion)
    report=$out/gpu-diffusion-check.md
    bench=/tmp/diffusion-bench
    xz -d -c "$G/diffusion-bench.xz" > "$bench" && chmod +x "$bench"
    models=/tmp/kiln-models
    mkdir -p "$models" && tar -xJf "$G/sd15-random.tar.xz" -C "$models"
    "${GPU_PYTHON:-/opt/torch/.venv/bin/python}" models/tools/fill_random_weights.py "$models/sd15-random"
    export KILN_MODELS__DIR=$models
    # cuDNN's exhaustive search at every new shape, in every worker the benchmark starts, would not
    # fit one call; both sides run with the same (heuristic) choice.
    export KILN_INFERENCE__CUDA__CONV_ALGORITHM_SEARCH=${KILN_INFERENCE__CUDA__CONV_ALGORITHM_SEARCH:-heuristic}
    start_services
    args=(--model sd15-random --size 512 --steps 20 --batches "1,4,8" --rounds 2)
    ;;
  steps)
    # Step-level vs whole-request batching of the SD 1.5-shaped pipeline at 512 px on CUDA
    # (scripts/bench-step-batching.sh with the kit's kiln), at the CUDA step cap for 512 px (6).
    report=$out/gpu-steps-check.md
    models=/tmp/kiln-models
    mkdir -p "$models" && tar -xJf "$G/sd15-random.tar.xz" -C "$models"
    "${GPU_PYTHON:-/opt/torch/.venv/bin/python}" models/tools/fill_random_weights.py "$models/sd15-random"
    export KILN_MODELS__DIR=$models KILN_MODELS__ENABLED=sd15-random
    export KILN_INFERENCE__CUDA__CONV_ALGORITHM_SEARCH=${KILN_INFERENCE__CUDA__CONV_ALGORITHM_SEARCH:-heuristic}
    start_services
    {
      echo "# GPU check (steps), $(date -u +%Y-%m-%dT%H:%MZ)"
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
      echo
    } > "$report"
    BENCH_KILN=/tmp/kiln PYTHON=${GPU_PYTHON:-/opt/torch/.venv/bin/python} MODEL=sd15-random SIZE=512 \
      BATCH=${BATCH:-6} DURATION=${DURATION:-30} CAPACITY_SECS=${CAPACITY_SECS:-15} UNLOADED=${UNLOADED:-3} \
      bash scripts/bench-step-batching.sh "$@" 2>&1 | tee -a "$report"
    cp target/bench/step-batching-*.json "$out/" 2>/dev/null || true
    exit 0
    ;;
  *) echo "unknown check: $mode (raw, worker, diffusion or steps)" >&2; exit 2 ;;
esac
if [ "$bench" = /tmp/raw-bench ]; then
  xz -d -c "$G/raw-bench.xz" > /tmp/raw-bench && chmod +x /tmp/raw-bench
fi
{
  echo "# GPU check ($mode), $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
  echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
  echo
} > "$report"
"$bench" "${args[@]}" "$@" 2>&1 | tee -a "$report"
cp target/bench/worker_throughput.json target/bench/raw_variants.json target/bench/diffusion_throughput.json "$out/" 2>/dev/null || true
