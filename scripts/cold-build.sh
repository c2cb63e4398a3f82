#!/usr/bin/env bash
# Time the README's first command's build from cold: `cargo build --locked --bin kiln` of REV
# (default HEAD) in a fresh clone with an empty target directory, crates already downloaded (so
# the figure is compile time, not network). Prints the wall time and the slowest compile units
# from cargo's --timings report, which it keeps under target/cold-build/<rev>/.
#   scripts/cold-build.sh            # this checkout's HEAD
#   scripts/cold-build.sh 8bd489e    # an earlier commit, to compare on the same machine
set -euo pipefail
cd "$(dirname "$0")/.."
rev=$(git rev-parse --short "${1:-HEAD}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone --quiet --no-checkout . "$work/src"
git -C "$work/src" checkout --quiet "$rev"
(cd "$work/src" && cargo fetch --locked --quiet)
start=$(date +%s)
(cd "$work/src" && CARGO_TARGET_DIR="$work/target" cargo build --locked --bin kiln --timings --quiet)
end=$(date +%s)
out="target/cold-build/$rev"
mkdir -p "$out"
cp "$work"/target/cargo-timings/cargo-timing.html "$out/"
echo "rev $rev: cold build of --bin kiln took $((end - start)) s on $(nproc) cores"
python3 - "$out/cargo-timing.html" <<'PY'
import json, re, sys
html = open(sys.argv[1]).read()
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);\n", html, re.S).group(1))
total = sum(u["duration"] for u in units)
print(f"{len(units)} units, {total:.0f} s of compile time in all (both cores' work added up)")
for u in sorted(units, key=lambda u: -u["duration"])[:12]:
    print(f"  {u['duration']:6.1f} s  {u['name']} {u['version']}{u['target']}")
PY
