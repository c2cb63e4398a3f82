#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on this machine, from Debian's rabbitmq-server, for tests and failover
# drills: nodes kc1..kc3@localhost on AMQP ports 5681..5683 (distribution 25681..25683), no plugins,
# data and logs under DIR, the system's Erlang cookie. Joined with `rabbitmqctl join_cluster`.
#   scripts/rabbitmq-cluster.sh start DIR   prints the three AMQP URLs, comma-separated
#   scripts/rabbitmq-cluster.sh stop-node DIR N
#   scripts/rabbitmq-cluster.sh stop DIR
set -euo pipefail
cmd=${1:?usage: rabbitmq-cluster.sh start|stop|stop-node DIR [N]}
base=${2:?a folder for the data of the nodes}
export HOME=/var/lib/rabbitmq # where the Erlang cookie the CLI shares with the nodes is
ctl() { rabbitmqctl -n "kc$1@localhost" -q "${@:2}"; }
case $cmd in
  start)
    mkdir -p "$base"
    echo "[]." >"$base/enabled_plugins"
    for i in 1 2 3; do
      d=$base/n$i
      mkdir -p "$d/mnesia" "$d/log"
      env RABBITMQ_NODENAME="kc$i@localhost" RABBITMQ_NODE_PORT=$((5680 + i)) RABBITMQ_DIST_PORT=$((25680 + i)) \
        RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_ENABLED_PLUGINS_FILE="$base/enabled_plugins" \
        RABBITMQ_PID_FILE="$d/pid" RABBITMQ_FEATURE_FLAGS_FILE="$d/feature_flags" \
        RABBITMQ_PLUGINS_EXPAND_DIR="$d/plugins-expand" RABBITMQ_CONFIG_FILE="$d/none" \
        setsid /usr/lib/rabbitmq/bin/rabbitmq-server >"$d/out.log" 2>&1 &
    done
    for i in 1 2 3; do
      for _ in $(seq 90); do
        ctl "$i" await_startup >/dev/null 2>&1 && break
        sleep 1
      done
      ctl "$i" await_startup >/dev/null
    done
    for i in 2 3; do
      ctl "$i" stop_app >/dev/null
      ctl "$i" join_cluster kc1@localhost >/dev/null
      ctl "$i" start_app >/dev/null
    done
    echo "amqp://guest:guest@127.0.0.1:5681/%2f,amqp://guest:guest@127.0.0.1:5682/%2f,amqp://guest:guest@127.0.0.1:5683/%2f"
    ;;
  stop-node)
    ctl "${3:?which node, 1 to 3}" stop >/dev/null
    ;;
  stop)
    for i in 3 2 1; do ctl "$i" stop >/dev/null 2>&1 || true; done
    rm -rf "$base"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
