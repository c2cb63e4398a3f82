#!/usr/bin/env bash
# Fuzz what kiln reads from producers (fuzz/main.rs: request and cancel bodies, prompts, traceparent
# headers, image headers, the PNG/JPEG/WebP decoders): each target in turn, its committed seeds
# first, then mutants, every input checked for panics, broken invariants, allocation over the
# target's bound and slowness. One summary line per target (the figures of RELIABILITY.md,
# "Fuzzing"); findings are saved under target/fuzz/<target>/ and make the script fail.
#   scripts/fuzz.sh                          # every target, 1 000 000 inputs each
#   scripts/fuzz.sh --inputs 50000 decode_png request
#   scripts/fuzz.sh --seed 7 --keep target/fuzz/found   # another sequence; keep what joined the corpus
#   scripts/fuzz.sh --list
# CI runs the short version: the fuzzer's tests (every seed, and a few thousand inputs per target)
# are part of `cargo nextest run --tests`.
set -euo pipefail
cd "$(dirname "$0")/.."
inputs=1000000
args=()
while (($#)); do
  case "$1" in
    --inputs) inputs="$2"; shift 2 ;;
    --list) cargo run --quiet --locked --example fuzz -- list; exit ;;
    *) args+=("$1"); shift ;;
  esac
done
# The dev profile: dependencies (the decoders, serde_json) at opt-level 3 as in the test build, kiln
# at 1, debug assertions and overflow checks on everywhere; and no build beyond the test build's.
exec cargo run --quiet --locked --example fuzz -- run --inputs "$inputs" "${args[@]}"
