#!/usr/bin/env bash
# Everything kiln needs on a fresh machine, idempotent:
#  - RabbitMQ and Redis running on localhost,
#  - the official ONNX Runtime 1.31.1 library (CPU build) in runtime/,
#  - a Python venv (.venv) with the example producer's and the schema checker's dependencies, and
#    the official onnxruntime package that computes the end-to-end test's reference outputs,
#  - Prometheus and promtool (Debian package `prometheus`) for the observability tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
scripts/fetch-onnxruntime.sh cpu >/dev/null

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pika, jsonschema, yaml, onnxruntime, PIL' 2>/dev/null; then
  echo "creating .venv (pika, jsonschema, onnxruntime) ..." >&2
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r examples/python/requirements.txt \
    -r schemas/requirements.txt -r tests/data/requirements.txt
fi

scripts/install-prometheus.sh
