#!/usr/bin/env bash
# Container health check: GET /healthz on the worker's HTTP port; healthy only on HTTP 200.
#
#   kiln-healthcheck [PATH]        (default /healthz)
#
# Bash's /dev/tcp instead of curl or wget: both bases (debian slim, nvidia/cuda ubuntu) ship bash,
# so the check adds no package, no TLS stack and nothing to patch to the image. The port is the one
# the worker binds (KILN_HTTP__BIND, default 0.0.0.0:9464); KILN_HEALTHCHECK_PORT overrides it.
set -euo pipefail
path=${1:-/healthz}
bind=${KILN_HTTP__BIND:-0.0.0.0:9464}
port=${KILN_HEALTHCHECK_PORT:-${bind##*:}}

exec 3<>"/dev/tcp/127.0.0.1/$port" || { echo "nothing listens on 127.0.0.1:$port" >&2; exit 1; }
printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&3
IFS= read -r -t 5 status <&3 || { echo "no answer from 127.0.0.1:$port$path" >&2; exit 1; }
status=${status%$'\r'}
case "$status" in
  "HTTP/1."[01]" 200"*) exit 0 ;;
  *) echo "127.0.0.1:$port$path answered: $status" >&2; exit 1 ;;
esac
