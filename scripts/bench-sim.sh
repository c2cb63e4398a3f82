#!/usr/bin/env bash
# Step-level against whole-request batching of a diffusion model, simulated (`kiln simulate`, a
# discrete-event simulation of the two policies on a step-time curve; no device needed):
#   - both curves (`h200-512`: published GPU figures; `cpu-tiny-256`: measured on the 2-vCPU VM) at
#     1, 2 and 3 × the whole-request policy's capacity, seed 1; at 2 × also seeds 2 to 5;
#   - at 2 ×, both policies at several caps on the same arrivals (`--caps`);
#   - at 2 × on the H200 curve: t(1) = 15 and 25 ms instead of 20 (results scale with it), SLOs of 6
#     and 10 × unloaded instead of 3, a flatter curve (8 × the image-steps/s at 16 instead of 3.2 ×),
#     and a UNet export with a scalar timestep.
# Prints the tables of BENCHMARKS.md ("Step-level batching on a GPU: discrete-event simulation");
# each run's full report is in target/bench/sim/<name>.md and .json. Extra arguments go to every run.
#   scripts/bench-sim.sh [--duration-secs 2000] [--slo-factor 3] ...
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --bin kiln
# The CPU curve's text encoder and VAE decode as fractions of a UNet call (the preset's 0.04 and 1.04):
# the three sessions of sd-tiny-random at 256 px, guided, 2 threads, alternating, medians of 15.
if [[ -x .venv/bin/python && -f models/sd-tiny-random/unet/model.onnx ]]; then
  echo "== sd-tiny-random phases (onnxruntime, 2 threads)" >&2
  .venv/bin/python - models/sd-tiny-random <<'PY'
import sys, time
import numpy as np, onnxruntime as ort
d = sys.argv[1]
o = ort.SessionOptions()
o.intra_op_num_threads = 2
s = lambda p: ort.InferenceSession(f"{d}/{p}/model.onnx", o, providers=["CPUExecutionProvider"])
te, unet, vae = s("text_encoder"), s("unet"), s("vae_decoder")
per_row = unet.get_inputs()[1].shape != []
rng = np.random.default_rng(0)
def once(b):
    ids = rng.integers(0, 49407, (2 * b, 77)).astype(np.int64)
    t0 = time.perf_counter(); h = te.run(None, {"input_ids": ids})[0]; t1 = time.perf_counter()
    lat = rng.standard_normal((2 * b, 4, 32, 32)).astype(np.float32)
    ts = np.full((2 * b,), 500.0, np.float32) if per_row else np.array(500.0, np.float32)
    unet.run(None, {"sample": lat, "timestep": ts, "encoder_hidden_states": h}); t2 = time.perf_counter()
    vae.run(None, {"latent_sample": lat[:b]}); t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2
for b in (1, 2):
    once(b)
runs = {1: [], 2: []}
for _ in range(15):
    for b in (1, 2):
        runs[b].append(once(b))
print("\n| requests | text encoder ms | UNet call ms | VAE decode ms | text encoder ÷ UNet | VAE decode ÷ UNet |")
print("| --- | --- | --- | --- | --- | --- |")
for b in (1, 2):
    e, u, v = (np.median(np.array(runs[b]), axis=0) * 1000).tolist()
    print(f"| {b} | {e:.1f} | {u:.1f} | {v:.1f} | {e / u:.3f} | {v / u:.2f} |")
PY
fi
out=target/bench/sim
mkdir -p "$out"
sim() {
  local name=$1
  shift
  echo "== $name: kiln simulate $*" >&2
  RUST_LOG=warn target/debug/kiln simulate --json "$out/$name.json" "$@" >"$out/$name.md"
}
for curve in h200-512 cpu-tiny-256; do
  for load in 1 2 3; do
    sim "$curve-load$load" --curve "$curve" --load "$load" "$@"
  done
  for seed in 2 3 4 5; do
    sim "$curve-load2-seed$seed" --curve "$curve" --load 2 --seed "$seed" "$@"
  done
done
sim h200-512-caps --curve h200-512 --load 2 --caps 1,2,4,6,8,12,16 "$@"
sim cpu-tiny-256-caps --curve cpu-tiny-256 --load 2 --caps 1,2,4 "$@"
sim h200-512-t1-15 --curve h200-512 --load 2 --t1-ms 15 "$@"
sim h200-512-t1-25 --curve h200-512 --load 2 --t1-ms 25 "$@"
sim h200-512-slo6 --curve h200-512 --load 2 --slo-factor 6 "$@"
sim h200-512-slo10 --curve h200-512 --load 2 --slo-factor 10 "$@"
sim flatter-curve --curve 1=20,16=40 --load 2 "$@"
sim h200-512-scalar-timestep --curve h200-512 --load 2 --scalar-timestep "$@"
python3 - "$out" <<'PY'
import json, math, sys
out = sys.argv[1]
load = lambda name: json.load(open(f"{out}/{name}.json"))
def g(m, name):
    return next(x for x in m["groups"] if x["name"] == name)
def f(x, d=2):
    return "-" if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else f"{x:.{d}f}"
def ratio(a, b):
    return a / b if b > 0 else float("nan")

print("\n| curve | load | mode (cap) | throughput req/s | goodput req/s | **goodput step ÷ request** | busy | requests per UNet call | paid in SLO | paid p99 ÷ unloaded (paid alone) | paid 4-step p99 ÷ unloaded | pauses |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for curve in ("h200-512", "cpu-tiny-256"):
    for l in (1, 2, 3):
        r = load(f"{curve}-load{l}")
        for m in (r["step"], r["request"]):
            first = m["mode"] == "step"
            print(f"| {curve if first and l == 1 else ''} | {l if first else ''} | {m['mode']} ({m['cap']}) | "
                  f"{f(m['throughput_per_sec'], 3)} | {f(m['goodput_per_sec'], 3)} | "
                  f"{'**' + f(r['goodput_ratio']) + '**' if first else ''} | {100 * m['busy']:.1f}% | "
                  f"{f(m['requests_per_unet_call'])} | {100 * g(m, 'paid')['within_slo']:.0f}% | "
                  f"{f(g(m, 'paid')['p99_over_unloaded'], 1)} ({f(m['paid_alone_p99_over_unloaded'], 1)}) | "
                  f"{f(g(m, 'paid 4 steps')['p99_over_unloaded'], 1)} | {m['pauses']} |")

print("\nAt 2 ×, five seeds (goodput req/s step / request, and their ratio; paid p99 ÷ unloaded step / request):\n")
print("| curve | seed 1 | seed 2 | seed 3 | seed 4 | seed 5 |")
print("| --- | --- | --- | --- | --- | --- |")
for curve in ("h200-512", "cpu-tiny-256"):
    cells = []
    for s in range(1, 6):
        r = load(f"{curve}-load2" if s == 1 else f"{curve}-load2-seed{s}")
        st, rq = r["step"], r["request"]
        cells.append(f"{f(st['goodput_per_sec'], 3)} / {f(rq['goodput_per_sec'], 3)} = {f(r['goodput_ratio'])}; "
                     f"{f(g(st, 'paid')['p99_over_unloaded'], 1)} / {f(g(rq, 'paid')['p99_over_unloaded'], 1)}")
    print(f"| {curve} | " + " | ".join(cells) + " |")

for curve in ("h200-512", "cpu-tiny-256"):
    r = load(f"{curve}-caps")
    print(f"\n{curve} at 2 × ({f(r['offered_per_sec'], 3)} req/s), same arrivals, step-level cap = whole-request max_batch_size:\n")
    print("| cap | t(cap) ÷ t(1) | step: goodput / throughput req/s | step: paid in SLO / paid p99 ÷ unloaded | request: goodput / throughput req/s | request: paid in SLO / paid p99 ÷ unloaded | goodput step ÷ request |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    pts = r["curve_points_ms"]
    def t(b):
        if len(pts) == 1:
            return pts[0][1] * b
        i = max(1, next((k for k, p in enumerate(pts) if p[0] >= b), len(pts) - 1))
        (b0, s0), (b1, s1) = pts[i - 1], pts[i]
        return s0 + (s1 - s0) * (b - b0) / (b1 - b0)
    for row in r["sweep"]:
        st, rq = row["step"], row["request"]
        print(f"| {row['cap']} | {t(row['cap']) / t(1):.2f} | {f(st['goodput_per_sec'], 3)} / {f(st['throughput_per_sec'], 3)} | "
              f"{100 * g(st, 'paid')['within_slo']:.0f}% / {f(g(st, 'paid')['p99_over_unloaded'], 1)} | "
              f"{f(rq['goodput_per_sec'], 3)} / {f(rq['throughput_per_sec'], 3)} | "
              f"{100 * g(rq, 'paid')['within_slo']:.0f}% / {f(g(rq, 'paid')['p99_over_unloaded'], 1)} | "
              f"{f(ratio(st['goodput_per_sec'], rq['goodput_per_sec']))} |")
    best = lambda mode: max(row[mode]["goodput_per_sec"] for row in r["sweep"])
    print(f"\nbest cap each: step {f(best('step'), 3)} req/s, request {f(best('request'), 3)} req/s: "
          f"**{f(ratio(best('step'), best('request')))}**")

print("\nH200 curve at 2 ×, what the result does and does not hinge on:\n")
print("| variant | capacity req/s (request / step) | goodput req/s step / request | goodput step ÷ request | paid p99 ÷ unloaded step / request |")
print("| --- | --- | --- | --- | --- |")
for name, label in (("h200-512-t1-15", "t(1) = 15 ms"), ("h200-512-load2", "t(1) = 20 ms (the preset)"),
                    ("h200-512-t1-25", "t(1) = 25 ms"), ("h200-512-slo6", "SLO 6 × unloaded"),
                    ("h200-512-slo10", "SLO 10 × unloaded"),
                    ("flatter-curve", "flatter curve `1=20,16=40` (8 × at 16)"),
                    ("h200-512-scalar-timestep", "scalar timestep (one UNet call per step index)")):
    r = load(name)
    st, rq = r["step"], r["request"]
    print(f"| {label} | {f(r['capacity']['request_per_sec'], 3)} / {f(r['capacity']['step_per_sec'], 3)} | "
          f"{f(st['goodput_per_sec'], 3)} / {f(rq['goodput_per_sec'], 3)} | {f(r['goodput_ratio'])} | "
          f"{f(g(st, 'paid')['p99_over_unloaded'], 1)} / {f(g(rq, 'paid')['p99_over_unloaded'], 1)} |")

for curve in ("h200-512", "cpu-tiny-256"):
    r = load(f"{curve}-load2")
    print(f"\nTargets at 2 × on {curve} (seed 1):")
    for t in r["targets"]:
        print(f"- {t['name']}: {f(t['value'])} (target {t['bound']}): {'met' if t['met'] else 'NOT met'}")
PY
