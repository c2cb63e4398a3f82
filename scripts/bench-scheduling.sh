#!/usr/bin/env bash
# Priority under overload, in one run: `kiln bench` at 0.3x the measured capacity (the unloaded
# reference), then at 3x, with the same tier mix; prints each run's table and the ratios the issue
# asks for (paid p99 wait loaded ÷ unloaded, paid rejections, busy fraction, free answered or
# deferred). JSON lands in target/bench/scheduling-{unloaded,overload}.json.
#   scripts/bench-scheduling.sh [--duration-secs S] [--mix free=0.6,plus=0.2,pro=0.2] [--size 256]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --locked --bin kiln
mkdir -p target/bench
run() {
  local name=$1 load=$2
  shift 2
  echo "== load ${load}x capacity" >&2
  RUST_LOG=warn target/release/kiln bench --load "$load" --json "target/bench/scheduling-$name.json" "$@"
}
run unloaded 0.3 "$@"
run overload 3 "$@"
.venv/bin/python - <<'PY'
import json
u = json.load(open("target/bench/scheduling-unloaded.json"))
o = json.load(open("target/bench/scheduling-overload.json"))
print()
print("| tier | p99 wait unloaded ms | p99 wait at 3x ms | ratio | p99 total unloaded / 3x ms | rejected at 3x | deferred at 3x | answered or deferred at 3x |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for tier, t in o["tiers"].items():
    base = u["tiers"].get(tier, {"wait_ms": [0, 0, 0], "total_ms": [0, 0, 0]})
    ratio = t["wait_ms"][2] / base["wait_ms"][2] if base["wait_ms"][2] else float("nan")
    accounted = t["sent"] - t["unanswered"]
    print(f"| {tier} | {base['wait_ms'][2]:.0f} | {t['wait_ms'][2]:.0f} | **{ratio:.2f}** | "
          f"{base['total_ms'][2]:.0f} / {t['total_ms'][2]:.0f} | {t['rejected']} | {t['deferred']} | {accounted} of {t['sent']} |")
print()
print(f"capacity {o['capacity_per_sec']:.1f} img/s; at 3x: offered {o['offered_per_sec']:.1f} req/s, "
      f"delivered {o['images_per_sec']:.1f} img/s, inference busy **{o['busy_fraction'] * 100:.1f}%**, "
      f"mean batch {o['mean_batch_size']:.2f}; unloaded: busy {u['busy_fraction'] * 100:.1f}%, mean batch {u['mean_batch_size']:.2f}")
PY
