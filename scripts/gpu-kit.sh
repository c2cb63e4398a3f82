#!/usr/bin/env bash
# Prepare the GPU check for the device machine (see ../shared/gpu/README.md). It fills .gk1 .. .gk6
# (git-ignored): ONNX Runtime's CUDA build in four parts (../shared/gpu/prepare-kit.sh, ~5 minutes);
# in .gk1 the benchmark (benches/worker_throughput.rs, stripped, xz); in .gk5 the kiln binary and a
# RabbitMQ and Redis that run from a folder (scripts/services-kit.sh), because that machine has
# neither; in .gk6 the diffusion benchmark (benches/diffusion_throughput.rs) and the graphs of a
# Stable Diffusion 1.5-shaped pipeline (benches/data/sd15-random.tar.xz, from
# models/tools/make_sd15_shaped.py; its 4.3 GB of random weights are written there). Then make the
# device calls it prints, one right after another: the fourth runs the raw check (fp32 vs fp16 vs
# pinned IoBinding on CUDA), the fifth worker vs raw on CUDA, the sixth the diffusion check
# (scripts/gpu-check.sh).
#   scripts/gpu-kit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .gk4/cuda.sha256 ] || ../shared/gpu/prepare-kit.sh
cargo bench --bench worker_throughput --bench diffusion_throughput --no-run --locked 2>&1 | tail -1
bin=$(find target/release/deps -maxdepth 1 -type f -executable -name 'worker_throughput-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)
strip -o target/raw-bench "$bin"
xz -9 -T2 -c target/raw-bench > .gk1/raw-bench.xz
mkdir -p .gk5
strip -o target/kiln-stripped target/release/kiln
xz -9 -T2 -c target/kiln-stripped > .gk5/kiln.xz
scripts/services-kit.sh .gk5/services.tar.xz
mkdir -p .gk6
bin=$(find target/release/deps -maxdepth 1 -type f -executable -name 'diffusion_throughput-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)
strip -o target/diffusion-bench "$bin"
xz -9 -T2 -c target/diffusion-bench > .gk6/diffusion-bench.xz
cp benches/data/sd15-random.tar.xz .gk6/
du -sh .gk1 .gk2 .gk3 .gk4 .gk5 .gk6
cat <<'CALLS'
Device calls (the `run` tool), one right after another:
  1. command: mkdir -p /root/gk && cp .gk1/* /root/gk/          carry: [".gk1"]
  2. command: cp .gk2/* /root/gk/                                carry: [".gk2"]
  3. command: cp .gk3/* /root/gk/                                carry: [".gk3"]
  4. command: cp .gk4/* /root/gk/ && bash scripts/gpu-check.sh raw      carry: [".gk4"]   timeout_s: 420
  5. command: cp .gk5/* /root/gk/ && bash scripts/gpu-check.sh worker   carry: [".gk5"]   timeout_s: 420
  6. command: cp .gk6/* /root/gk/ && bash scripts/gpu-check.sh diffusion   carry: [".gk6"]   timeout_s: 540
The six exceed one session's 15 device minutes. For the diffusion figures alone: calls 1 to 3, then
  command: cp .gk4/* /root/gk/      carry: [".gk4"]
  command: cp .gk5/* /root/gk/      carry: [".gk5"]
then call 6.
For step-level batching (issue 15) on the GPU, after calls 1 to 3 and .gk4/.gk5 copied as above:
  7. command: cp .gk6/* /root/gk/ && bash scripts/gpu-check.sh steps   carry: [".gk6"]   timeout_s: 540
Then give_back, and copy the tables from $OUT (gpu-check.md, gpu-worker-check.md,
gpu-diffusion-check.md, gpu-steps-check.md) into BENCHMARKS.md, "GPU".
CALLS
