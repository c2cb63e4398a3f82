#!/usr/bin/env bash
# Fetch the official ONNX Runtime shared library that kiln loads at run time (ort's `load-dynamic`).
#
#   scripts/fetch-onnxruntime.sh [cpu|cuda]     (default: cpu)
#
# The library comes from the official PyPI wheel (`onnxruntime==1.31.1` for CPU,
# `onnxruntime-gpu==1.31.1` for CUDA 13 + cuDNN 9): pip downloads the wheel, nothing is installed,
# and the `.so` files are unpacked into runtime/onnxruntime-<version>-<flavor>/, which is where
# kiln looks by default (inference.runtime_library). Idempotent: does nothing when already there.
set -euo pipefail

flavor=${1:-cpu}
version=${ORT_VERSION:-1.31.1}
case "$flavor" in
  cpu) package=onnxruntime ;;
  cuda) package=onnxruntime-gpu ;;
  *) echo "usage: $0 [cpu|cuda]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/runtime/onnxruntime-$version-$flavor"
if [ -f "$dest/libonnxruntime.so.$version" ]; then
  echo "$dest/libonnxruntime.so.$version"
  exit 0
fi

python=$(command -v python3 || command -v python || true)
[ -n "$python" ] || { echo "python3 with pip is needed to download the $package wheel" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "downloading $package==$version from PyPI ..." >&2
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --python-version 3.11 --implementation cp -d "$work" "$package==$version" >&2
wheel=$(ls "$work"/*.whl)
(cd "$work" && "$python" -m zipfile -e "$wheel" unpacked >/dev/null)
mkdir -p "$dest.partial"
cp "$work"/unpacked/onnxruntime/capi/libonnxruntime*.so* "$dest.partial/"
# The wheel ships libonnxruntime.so.<version>; ort dlopens that exact file.
[ -f "$dest.partial/libonnxruntime.so.$version" ] || { echo "the wheel has no libonnxruntime.so.$version" >&2; exit 1; }
(cd "$dest.partial" && sha256sum ./* > SHA256SUMS)
echo "$package==$version $(basename "$wheel")" > "$dest.partial/SOURCE"
rm -rf "$dest" && mv "$dest.partial" "$dest"
echo "$dest/libonnxruntime.so.$version"
