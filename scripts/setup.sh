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
# This machine's broker may still hold dead-letter and delay queues of the demo and the deployment
# checks as an earlier kiln declared them (classic; now quorum, docs/deploy.md "Upgrading"), which a
# worker cannot redeclare: they are this machine's own, delete them.
if command -v rabbitmqctl >/dev/null; then
  rabbitmqctl -q list_queues name type 2>/dev/null |
    awk '$2 == "classic" && ($1 ~ /^kiln[-a-z0-9]*\.dead-letter$/ || $1 ~ /^kiln[-a-z0-9]*\.deferred\.[0-9]+$/) {print $1}' |
    while read -r queue; do rabbitmqctl -q delete_queue "$queue" </dev/null >/dev/null; done || true
fi
