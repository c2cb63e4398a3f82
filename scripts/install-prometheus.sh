#!/usr/bin/env bash
# Install the Prometheus server and promtool from Debian if either is missing (idempotent,
# non-interactive). The observability tests run their own Prometheus on a free port with a temporary
# config and data directory, so nothing may keep port 9090 or any other fixed port: the package's
# maintainer scripts are stopped from starting its service (policy-rc.d exit 101 is the Debian way to
# say "no service starts during this install"; deb-systemd-invoke honours it too).
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi

SUDO=
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi

echo "installing prometheus and promtool (Debian package prometheus) ..." >&2
policy=/usr/sbin/policy-rc.d
created_policy=
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\n# kiln scripts/install-prometheus.sh: no service starts while packages install\nexit 101\n' \
    | $SUDO tee "$policy" >/dev/null
  $SUDO chmod 0755 "$policy"
  created_policy=1
fi
cleanup() {
  if [ -n "$created_policy" ]; then
    $SUDO rm -f "$policy"
  fi
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null

command -v promtool >/dev/null && command -v prometheus >/dev/null
