#!/usr/bin/env bash
# Diffusion: a worker end to end vs a raw ONNX Runtime pipeline loop (text encoder, N UNet steps,
# VAE) on the same model, size, steps and batch; and the UNet's time per call by batch size.
#   scripts/bench-diffusion.sh [--model sd-tiny-random] [--size 256] [--steps 20] [--batches 1,2,4] [--threads N] [--rounds R]
# Prints Markdown tables; the figures land in target/bench/diffusion_throughput.json.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo bench --bench diffusion_throughput -- "$@"
