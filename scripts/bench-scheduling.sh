#!/usr/bin/env bash
# Priority under overload, in one run (`kiln bench`, release build, a worker in-process with its own
# queues and Redis keys):
#   1. overload: 3x the measured capacity, mix free 0.8 / plus 0.1 / pro 0.1 (the paid tiers alone
#      ask for 0.6x capacity: a viral free feature on top of normal paid traffic);
#   2. paid alone: the same paid request rates, no free traffic: what paid users see when the free
#      flood is absent (the "unloaded" reference for isolation);
#   3. light: 0.3x capacity with the same mix (every tier near its floor).
# Prints each run's table and the ratios (paid p99 wait at 3x ÷ paid alone, and ÷ light), paid
# rejections, busy fraction, free answered or deferred. JSON: target/bench/scheduling-*.json.
#   scripts/bench-scheduling.sh [--duration-secs S] [--size 256]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bin kiln
mkdir -p target/bench
bench() {
  local name=$1
  shift
  echo "== $name: kiln bench $*" >&2
  RUST_LOG=warn target/release/kiln bench --json "target/bench/scheduling-$name.json" "$@"
}
bench overload --load 3 --mix free=0.8,plus=0.1,pro=0.1 "$@"
paid_rate=$(.venv/bin/python -c 'import json; print(json.load(open("target/bench/scheduling-overload.json"))["offered_per_sec"] * 0.2)')
bench paid-alone --rate "$paid_rate" --mix plus=0.5,pro=0.5 "$@"
bench light --load 0.3 --mix free=0.8,plus=0.1,pro=0.1 "$@"
.venv/bin/python - <<'PY'
import json
runs = {n: json.load(open(f"target/bench/scheduling-{n}.json")) for n in ("overload", "paid-alone", "light")}
o, a, l = runs["overload"], runs["paid-alone"], runs["light"]
print()
print("| tier | p99 wait at 3x ms | paid alone ms | **3x ÷ paid alone** | light (0.3x) ms | 3x ÷ light | p99 total at 3x / alone ms | rejected at 3x | deferred at 3x | answered or deferred at 3x |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for tier, t in o["tiers"].items():
    alone = a["tiers"].get(tier)
    light = l["tiers"][tier]
    r_alone = f"**{t['wait_ms'][2] / alone['wait_ms'][2]:.2f}**" if alone else "-"
    alone_ms = f"{alone['wait_ms'][2]:.0f}" if alone else "-"
    alone_total = f"{alone['total_ms'][2]:.0f}" if alone else "-"
    print(f"| {tier} | {t['wait_ms'][2]:.0f} | {alone_ms} | {r_alone} | {light['wait_ms'][2]:.0f} | "
          f"{t['wait_ms'][2] / light['wait_ms'][2]:.2f} | {t['total_ms'][2]:.0f} / {alone_total} | {t['rejected']} | "
          f"{t['deferred']} | {t['sent'] - t['unanswered']} of {t['sent']} |")
print()
print(f"capacity {o['capacity_per_sec']:.1f} img/s; at 3x: offered {o['offered_per_sec']:.1f} req/s, "
      f"delivered {o['images_per_sec']:.1f} img/s, inference busy **{o['busy_fraction'] * 100:.1f}%**, "
      f"mean batch {o['mean_batch_size']:.2f}; paid alone: offered {a['offered_per_sec']:.1f} req/s, busy "
      f"{a['busy_fraction'] * 100:.1f}%; light: busy {l['busy_fraction'] * 100:.1f}%")
print(f"inference time per image (busy ÷ images): at 3x {o['busy_ms_per_image']:.1f} ms, paid alone "
      f"{a['busy_ms_per_image']:.1f} ms, light {l['busy_ms_per_image']:.1f} ms")
PY
