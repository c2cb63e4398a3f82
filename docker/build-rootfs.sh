#!/usr/bin/env bash
# Lay out a kiln image's filesystem under DEST: what the Dockerfile copies into the CPU and GPU
# images, and what CI checks natively (scripts/check-deploy.sh), so both use the same recipe.
#
#   docker/build-rootfs.sh [--flavor cpu|cuda] [--profile release|dev|<cargo profile>] [--no-build] DEST
#
#   DEST/opt/kiln/bin/kiln                       the worker (cargo profile --profile, default release)
#   DEST/opt/kiln/bin/kiln-healthcheck           HTTP GET /healthz on 127.0.0.1:9464 (bash only)
#   DEST/opt/kiln/models/<model>/                manifest.toml, ONNX files, LICENSE, ORIGIN.md
#   DEST/opt/kiln/runtime/libonnxruntime.so.*    ONNX Runtime 1.31.1 from PyPI: onnxruntime (cpu) or
#                                                onnxruntime-gpu (cuda, CUDA 13 + cuDNN 9), SHA256SUMS
#   DEST/opt/kiln/BUILD                          flavor, profile, ONNX Runtime wheel, source commit
#   DEST/etc/kiln/kiln.toml                      docker/kiln.toml, execution provider set by flavor
#
# The binary is built with `cargo build --locked --profile <profile> --bin kiln` (a no-op when it is
# up to date: CI passes `--profile dev` to reuse the debug build the tests make instead of a second,
# release build); `--no-build` only copies an existing one. The ONNX Runtime library comes from
# scripts/fetch-onnxruntime.sh (idempotent: nothing is downloaded when runtime/ already has it).
set -euo pipefail

usage() { sed -n '4p' "$0" | sed 's/^#  */usage: /' >&2; exit 2; }

flavor=cpu
profile=release
build=1
dest=
while [ $# -gt 0 ]; do
  case "$1" in
    --flavor) flavor=${2:?}; shift 2 ;;
    --profile) profile=${2:?}; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [ -z "$dest" ] || usage; dest=$1; shift ;;
  esac
done
[ -n "$dest" ] || usage
case "$flavor" in cpu|cuda) ;; *) echo "--flavor must be cpu or cuda" >&2; exit 2 ;; esac

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# Cargo puts the dev profile under target/debug and every other profile under target/<name>.
case "$profile" in dev|debug) profile=dev; profile_dir=debug ;; *) profile_dir=$profile ;; esac
target_dir=${CARGO_TARGET_DIR:-$root/target}
binary=$target_dir/$profile_dir/kiln
if [ "$build" = 1 ]; then
  cargo build --locked --profile "$profile" --bin kiln
fi
[ -x "$binary" ] || { echo "no kiln binary at $binary (build it, or drop --no-build)" >&2; exit 1; }

runtime=$("$root/scripts/fetch-onnxruntime.sh" "$flavor")
runtime=$(dirname "$runtime")
# The library is what every request runs through: refuse a copy that does not match its checksums.
(cd "$runtime" && sha256sum --quiet --check SHA256SUMS) || { echo "$runtime does not match its SHA256SUMS" >&2; exit 1; }

mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
opt=$dest/opt/kiln
rm -rf "$opt" "$dest/etc/kiln"
install -d -m 0755 "$opt/bin" "$opt/models" "$opt/runtime" "$dest/etc/kiln"

install -m 0755 "$binary" "$opt/bin/kiln"
install -m 0755 docker/healthcheck.sh "$opt/bin/kiln-healthcheck"

# Every model folder with a manifest (models/tools is not a model). Only what the worker reads and
# what the licences require travels: the manifest, the ONNX files (and their external weights), a
# diffusion folder's configs and tokenizer files, LICENSE and ORIGIN.md.
for manifest in models/*/manifest.toml; do
  model=$(dirname "$manifest")
  (cd "$model" && find . -type f \( -name manifest.toml -o -name '*.onnx' -o -name '*.onnx_data' \
      -o -name '*.json' -o -name merges.txt -o -name LICENSE -o -name ORIGIN.md \) -printf '%P\n') |
    while read -r f; do
      install -D -m 0644 "$model/$f" "$opt/models/$(basename "$model")/$f"
    done
done

# ONNX Runtime looks for its provider libraries (libonnxruntime_providers_*.so) next to itself.
for f in "$runtime"/*; do install -m 0644 "$f" "$opt/runtime/"; done

sed "s/@EXECUTION_PROVIDER@/$flavor/" docker/kiln.toml > "$dest/etc/kiln/kiln.toml"
chmod 0644 "$dest/etc/kiln/kiln.toml"

commit=${SOURCE_COMMIT:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}
{
  echo "flavor=$flavor"
  echo "cargo_profile=$profile"
  echo "onnxruntime=$(cat "$runtime/SOURCE")"
  echo "commit=$commit"
} > "$opt/BUILD"
chmod 0644 "$opt/BUILD"

echo "kiln rootfs ($flavor, $profile) in $dest:" >&2
(cd "$dest" && find opt etc -type f | sort) >&2
