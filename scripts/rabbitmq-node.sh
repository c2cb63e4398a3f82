#!/usr/bin/env bash
# One RabbitMQ node of its own on this machine, from Debian's rabbitmq-server, for the fault drills
# that restart the broker (tests/integration/drills.rs, scripts/drills.sh) without touching the
# shared one on 5672: node kd1@localhost, AMQP port 5687 (distribution 25687), no plugins, data and
# logs under DIR, the system's Erlang cookie. Its queues are durable and the request queues quorum
# queues, so they come back with their messages after a restart.
#   scripts/rabbitmq-node.sh start DIR     prints the node's AMQP URL once it accepts connections
#   scripts/rabbitmq-node.sh restart DIR   stops the node (`rabbitmqctl stop`: the whole Erlang VM,
#                                          as a pod restart does) and starts it again on the same
#                                          data; returns once it accepts connections again
#   scripts/rabbitmq-node.sh stop DIR      stops it and removes DIR
set -euo pipefail
cmd=${1:?usage: rabbitmq-node.sh start|restart|stop DIR}
base=${2:?a folder for the data of the node}
export HOME=/var/lib/rabbitmq # where the Erlang cookie the CLI shares with the node is
node=kd1@localhost
amqp_port=5687
dist_port=25687
ctl() { rabbitmqctl -n "$node" -q "$@"; }

boot() {
  mkdir -p "$base/mnesia" "$base/log"
  echo "[]." >"$base/enabled_plugins"
  env RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$amqp_port" RABBITMQ_DIST_PORT="$dist_port" \
    RABBITMQ_MNESIA_BASE="$base/mnesia" RABBITMQ_LOG_BASE="$base/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" RABBITMQ_PID_FILE="$base/pid" \
    RABBITMQ_FEATURE_FLAGS_FILE="$base/feature_flags" RABBITMQ_PLUGINS_EXPAND_DIR="$base/plugins-expand" \
    RABBITMQ_CONFIG_FILE="$base/none" \
    setsid /usr/lib/rabbitmq/bin/rabbitmq-server >>"$base/out.log" 2>&1 &
  for _ in $(seq 90); do
    ctl await_startup >/dev/null 2>&1 && return 0
    sleep 1
  done
  ctl await_startup >/dev/null
}

case $cmd in
  start)
    if ctl status >/dev/null 2>&1; then
      echo "node $node is already running (another drill, or a leftover: rabbitmqctl -n $node stop)" >&2
      exit 1
    fi
    boot
    echo "amqp://guest:guest@127.0.0.1:$amqp_port/%2f"
    ;;
  restart)
    ctl stop >/dev/null
    boot
    ;;
  stop)
    ctl stop >/dev/null 2>&1 || true
    rm -rf "$base"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
