#!/usr/bin/env bash
# The whole test suite, as CI runs it: the deployment checks (images' layout, compose, k8s, alert
# rules: scripts/check-deploy.sh), formatting, lints, the published schemas, then every Rust test
# (unit and integration, against the real RabbitMQ and ONNX Runtime on CPU) with nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check-deploy.sh

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
.venv/bin/python schemas/check_schemas.py
cargo nextest run --lib --bins --tests --locked --no-fail-fast
