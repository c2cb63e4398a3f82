#!/usr/bin/env bash
# Check that the services kit (scripts/services-kit.sh) runs on a machine that has none of it: start
# it in a mount namespace where this machine's own Erlang, RabbitMQ, Redis, and the libraries and
# OpenSSL modules the kit bundles are hidden, on ports beside the running services, and fail if any
# of its processes maps a shared library from outside the kit other than glibc's. Needs root (unshare -m).
#   scripts/services-check.sh [KIT.tar.xz]      (default: .gk5/services.tar.xz, built if absent)
set -euo pipefail
cd "$(dirname "$0")/.."
kit=${1:-.gk5/services.tar.xz}
[ -f "$kit" ] || scripts/services-kit.sh "$kit"
kit=$(readlink -f "$kit")
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
multiarch=/usr/lib/x86_64-linux-gnu

# shellcheck disable=SC2016  # expanded by the inner bash
unshare -m bash -euo pipefail -c '
  kit=$1 dir=$2 multiarch=$3
  for d in /usr/lib/erlang /usr/lib/rabbitmq "$multiarch/ossl-modules"; do
    [ -d "$d" ] && mount -t tmpfs none "$d"
  done
  for f in /usr/bin/erl /usr/bin/escript /usr/bin/epmd /usr/bin/redis-server /usr/bin/redis-cli \
    /usr/sbin/rabbitmqctl /usr/sbin/rabbitmq-server "$multiarch"/libjemalloc.so.2 \
    "$multiarch"/liblzf.so.1 "$multiarch"/libssl.so.3 "$multiarch"/libcrypto.so.3; do
    [ -e "$f" ] && mount --bind /dev/null "$f"
  done
  trap "\"$dir/run/stop.sh\" 2>/dev/null || true" EXIT
  SERVICES_AMQP_PORT=5679 SERVICES_REDIS_PORT=6389 SERVICES_EPMD_PORT=4379 SERVICES_DIST_PORT=25679 \
    scripts/services-start.sh "$kit" "$dir/run"
  status=0
  for pid in $(pgrep -f "$dir/run/kit/.*(beam.smp|redis-server|epmd)"); do
    outside=$(awk "\$6 ~ /\\.so/ {print \$6}" "/proc/$pid/maps" | sort -u |
      grep -v -e "^$dir/run/" -e "/ld-linux-x86-64.so.2$" -e "/libc.so.6$" -e "/libm.so.6$" || true)
    echo "$(readlink "/proc/$pid/exe"): ${outside:-only the kit and glibc}"
    [ -z "$outside" ] || status=1
  done
  [ -n "$(pgrep -f "$dir/run/kit/.*beam.smp")" ] || { echo "no RabbitMQ process" >&2; status=1; }
  exit $status
' services-check "$kit" "$dir" "$multiarch"
echo "services kit: ok"
