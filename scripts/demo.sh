#!/usr/bin/env bash
# Set everything up and run the main job end to end on the bundled defaults: a kiln worker on
# RabbitMQ, the bundled photo samples/astronaut.jpg sent through the real queue, stylized by the
# bundled multistyle26 model (style 7) on ONNX Runtime (CPU); a prompt drawn and the photo edited
# twice by the bundled tiny diffusion models (random weights: noise-like pictures, real pipelines);
# the PNGs written to target/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --locked --bin kiln
kiln=target/debug/kiln
mkdir -p target/demo

"$kiln" worker > target/demo/worker.log 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  grep -q "worker ready" target/demo/worker.log && break
  kill -0 $worker 2>/dev/null || { cat target/demo/worker.log >&2; exit 1; }
  sleep 0.1
done

"$kiln" submit samples/astronaut.jpg --style 7 --out target/demo/astronaut-style7.png
"$kiln" submit samples/coffee.jpg --model arbitrary-style --style-image samples/astronaut.jpg \
  --out target/demo/coffee-in-the-style-of-astronaut.png
"$kiln" submit --model sd-tiny-random --prompt "a lighthouse in a storm, oil painting" --seed 42 \
  --out target/demo/lighthouse-seed42.png
"$kiln" submit samples/astronaut.jpg --model pix2pix-tiny-random --prompt "make it snow" --seed 7 \
  --width 128 --height 128 --out target/demo/astronaut-edit-1.png
"$kiln" submit target/demo/astronaut-edit-1.png --model pix2pix-tiny-random --prompt "now at night" --seed 7 \
  --out target/demo/astronaut-edit-2.png
