#!/usr/bin/env bash
# Step-level vs whole-request batching of a diffusion model (issue 15), one `kiln bench --workload
# diffusion` run per mode (release build, worker in-process with its own queues and Redis keys):
#   1. request: `[batching.diffusion] mode = "request"`; measures each step count alone (the
#      unloaded reference), then the capacity closed-loop with the step mix, then sends at
#      LOAD x that capacity;
#   2. step: `mode = "step"`, the same offered rate (`--rate`, from run 1), the same seed (same
#      arrival times, tiers, step counts, prompts and noise seeds), the same SLOs (`--slo-base-ms`:
#      run 1's unloaded p50 per step count); it measures its own unloaded reference too.
# Both modes run at most BATCH requests at once (the step-level cap for the size, and the
# whole-request batch size), so they differ in scheduling only.
# The capacity is measured once, in request mode: the offered load is defined against the system
# step-level batching replaces, and both modes must get the same offered load for their goodput to
# compare.
# Prints each run's tables, then the comparison; JSON: target/bench/step-batching-<mode>.json.
#   [LOAD=2] [BATCH=2] [DURATION=40] [SEED=15] [CAPACITY_SECS=20] [UNLOADED=5] scripts/bench-step-batching.sh [more kiln bench args]
# On a machine with a prebuilt kiln and no registry (the GPU kit: scripts/gpu-check.sh steps):
#   BENCH_KILN=/tmp/kiln PYTHON=... MODEL=sd15-random SIZE=512 BATCH=6 scripts/bench-step-batching.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BENCH_KILN:-}" ]; then
  scripts/setup.sh
  cargo build --release --locked --bin kiln
fi
kiln=${BENCH_KILN:-target/release/kiln}
python=${PYTHON:-.venv/bin/python}
out=target/bench
mkdir -p "$out"
common=(--workload diffusion --diffusion-model "${MODEL:-sd-tiny-random}" --size "${SIZE:-256}"
  --steps-mix 4=0.4,20=0.3,50=0.3 --mix free=0.6,plus=0.2,pro=0.2
  --batch "${BATCH:-2}" --duration-secs "${DURATION:-40}" --seed "${SEED:-15}"
  --unloaded-requests "${UNLOADED:-5}" --slo-factor 3)
bench() {
  local mode=$1
  shift
  echo "== $mode: kiln bench ${common[*]} $*" >&2
  cut -d' ' -f1-3 /proc/loadavg >"$out/step-batching-$mode.load"
  KILN_BATCHING__DIFFUSION__MODE=$mode RUST_LOG=warn \
    "$kiln" bench --json "$out/step-batching-$mode.json" "${common[@]}" "$@"
  cut -d' ' -f1-3 /proc/loadavg >>"$out/step-batching-$mode.load"
}
bench request --load "${LOAD:-2}" --capacity-secs "${CAPACITY_SECS:-20}" "$@"
rate=$("$python" -c "import json; print(json.load(open('$out/step-batching-request.json'))['offered_per_sec'])")
slo_base=$("$python" -c "
import json
u = json.load(open('$out/step-batching-request.json'))['diffusion']['unloaded']
print(','.join(f'{s}={v[\"p50_ms\"]:.1f}' for s, v in u.items()))")
bench step --rate "$rate" --slo-base-ms "$slo_base" "$@"
OUT=$out "$python" - <<'PY'
import json, os
out = os.environ["OUT"]
runs = {m: json.load(open(f"{out}/step-batching-{m}.json")) for m in ("request", "step")}
loads = {m: open(f"{out}/step-batching-{m}.load").read().split("\n")[:2] for m in runs}
r, s = runs["request"], runs["step"]
rd, sd = r["diffusion"], s["diffusion"]
ratio = lambda a, b: a / b if b else float("nan")
print()
print(f"capacity (request mode, closed loop, step mix) {r['capacity_per_sec']:.3f} img/s; offered to both "
      f"{r['offered_per_sec']:.3f} req/s; at most {rd['batch']} requests at once; SLO = {rd['slo_factor']:g} x "
      f"request mode's unloaded p50: " + ", ".join(f"{k} steps {v:.0f} ms" for k, v in rd["slo_ms"].items()))
print()
print("| mode | goodput img/s | throughput img/s | busy | requests per UNet call | ms per image-step | within SLO / sent | expired | errors | deferred | degraded | unanswered | load avg before / after |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for m, run in runs.items():
    d = run["diffusion"]
    g = d["by_tier"].values()
    total = lambda k: sum(x[k] for x in g)
    print(f"| {m} | {d['goodput_per_sec']:.3f} | {run['images_per_sec']:.3f} | {run['busy_fraction'] * 100:.1f}% | "
          f"{d['requests_per_denoising_call'] or float('nan'):.2f} | {d['ms_per_image_step'] or float('nan'):.1f} | "
          f"{total('within_slo')} / {total('sent')} | {total('expired')} | {total('errors') + total('rejected')} | "
          f"{total('deferred')} | {total('degraded')} | {total('unanswered')} | {' / '.join(loads[m])} |")
print()
print("p99 total latency (publish to reply), ms, and ÷ the same run's unloaded p99 (a tier's: the step mix's):")
print()
print("| group | unloaded p99 request / step | request p50 / p99 | **request ÷ unloaded** | step p50 / p99 | **step ÷ unloaded** | step p99 ÷ request p99 | within SLO request / step (sent) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
def rows(key, unloaded):
    order = lambda k: (k.split("/")[0], int(k.split("/")[1])) if "/" in k else (k, 0)
    for name in sorted(rd[key], key=order) if key == "by_tier_steps" else rd[key]:
        a, b = rd[key][name], sd[key].get(name)
        if b is None:
            continue
        label = name if key == "by_tier" else f"{name} steps"
        if key == "by_tier_steps":
            label = f"{name.split('/')[0]}, {name.split('/')[1]} steps"
        print(f"| {label} | {unloaded(rd, name):.0f} / {unloaded(sd, name):.0f} | {a['total_ms'][0]:.0f} / {a['total_ms'][1]:.0f} | "
              f"**{a['p99_over_unloaded']:.2f}** | {b['total_ms'][0]:.0f} / {b['total_ms'][1]:.0f} | **{b['p99_over_unloaded']:.2f}** | "
              f"{ratio(b['total_ms'][1], a['total_ms'][1]):.2f} | {a['within_slo']} / {b['within_slo']} ({a['sent']}) |")
rows("by_tier", lambda d, _: d["unloaded_mix_ms"][1])
rows("by_steps", lambda d, k: d["unloaded"][k]["p99_ms"])
rows("by_tier_steps", lambda d, k: d["unloaded"][k.split("/")[1]]["p99_ms"])
print()
gain = ratio(sd["goodput_per_sec"], rd["goodput_per_sec"])
paid = {t: sd["by_tier"][t]["p99_over_unloaded"] for t in sd["by_tier"] if t != "free"}
short = sd["by_steps"][min(sd["by_steps"], key=int)]
verdict = lambda ok: "met" if ok else "NOT met"
print(f"- goodput step ÷ request: **{gain:.2f}** (target ≥ 1.3: {verdict(gain >= 1.3)})")
for t, v in paid.items():
    print(f"- {t} p99 in step mode ÷ unloaded: **{v:.2f}** (target ≤ 2: {verdict(v <= 2)})")
print(f"- busy in step mode: **{s['busy_fraction'] * 100:.1f}%** (target ≥ 95%: {verdict(s['busy_fraction'] >= 0.95)}); "
      f"request mode {r['busy_fraction'] * 100:.1f}%")
fewest = min(sd["by_steps"], key=int)
print(f"- {fewest}-step p99 in step mode ÷ unloaded: **{short['p99_over_unloaded']:.2f}** "
      f"(target ≤ 2: {verdict(short['p99_over_unloaded'] <= 2)}); request mode "
      f"{rd['by_steps'][fewest]['p99_over_unloaded']:.2f}; paid tiers' {fewest}-step requests, step / request: "
      + ", ".join(f"{t} {sd['by_tier_steps'][f'{t}/{fewest}']['p99_over_unloaded']:.2f} / "
                  f"{rd['by_tier_steps'][f'{t}/{fewest}']['p99_over_unloaded']:.2f}"
                  for t in paid if f"{t}/{fewest}" in sd["by_tier_steps"] and f"{t}/{fewest}" in rd["by_tier_steps"]))
drift = ratio(rd["ms_per_image_step"] or 0, sd["ms_per_image_step"] or 0)
print(f"- device speed under load, UNet ms per image-step request / step mode: {rd['ms_per_image_step'] or float('nan'):.1f} / "
      f"{sd['ms_per_image_step'] or float('nan'):.1f} (÷ {drift:.2f}; the same calls in both modes, so a ratio away from 1 "
      f"is the machine's drift between the runs)")
print("- request mode's busy fraction is counted when a whole batch ends, so it is within one batch (up to ~3 s of the "
      "window at 50 steps) of the truth; step mode counts every tick")
PY
