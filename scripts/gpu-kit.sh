#!/usr/bin/env bash
# Prepare the GPU check for the device machine (see ../shared/gpu/README.md). It fills .gk1 .. .gk5
# (git-ignored): ONNX Runtime's CUDA build in four parts (../shared/gpu/prepare-kit.sh, ~5 minutes);
# in .gk1 the benchmark (benches/worker_throughput.rs, stripped, xz); in .gk5 the kiln binary and a
# RabbitMQ and Redis that run from a folder (scripts/services-kit.sh), because that machine has
# neither. Then make the five device calls it prints, one right after another: the fourth runs the
# raw check (fp32 vs fp16 vs pinned IoBinding on CUDA), the fifth worker vs raw on CUDA
# (scripts/gpu-check.sh).
#   scripts/gpu-kit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .gk4/cuda.sha256 ] || ../shared/gpu/prepare-kit.sh
cargo bench --bench worker_throughput --no-run --locked 2>&1 | tail -1
bin=$(find target/release/deps -maxdepth 1 -type f -executable -name 'worker_throughput-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)
strip -o target/raw-bench "$bin"
xz -9 -T2 -c target/raw-bench > .gk1/raw-bench.xz
mkdir -p .gk5
strip -o target/kiln-stripped target/release/kiln
xz -9 -T2 -c target/kiln-stripped > .gk5/kiln.xz
scripts/services-kit.sh .gk5/services.tar.xz
du -sh .gk1 .gk2 .gk3 .gk4 .gk5
cat <<'CALLS'
Device calls (the `run` tool), one right after another:
  1. command: mkdir -p /root/gk && cp .gk1/* /root/gk/          carry: [".gk1"]
  2. command: cp .gk2/* /root/gk/                                carry: [".gk2"]
  3. command: cp .gk3/* /root/gk/                                carry: [".gk3"]
  4. command: cp .gk4/* /root/gk/ && bash scripts/gpu-check.sh raw      carry: [".gk4"]   timeout_s: 420
  5. command: cp .gk5/* /root/gk/ && bash scripts/gpu-check.sh worker   carry: [".gk5"]   timeout_s: 420
Then give_back, and copy the tables from $OUT (gpu-check.md, gpu-worker-check.md) into BENCHMARKS.md, "GPU".
CALLS
