#!/usr/bin/env bash
# A Redis Cluster on this machine, from Debian's redis-server, for tests, benchmarks and failover
# drills: 3 masters and 3 replicas on ports BASE+1..BASE+6 (cluster bus: +10000), cluster-node-timeout
# 1000 ms (a dead master's replica takes over in about 2 s), no persistence, data and logs under DIR.
# Made with `redis-cli --cluster create --cluster-replicas 1`.
#   scripts/redis-cluster.sh start DIR [BASE]   prints the six node URLs, comma-separated (BASE 7100)
#   scripts/redis-cluster.sh kill-node DIR PORT  SIGKILL one node (a crash: no handover)
#   scripts/redis-cluster.sh stop DIR
set -euo pipefail
cmd=${1:?usage: redis-cluster.sh start|kill-node|stop DIR [BASE|PORT]}
base=${2:?a folder for the data of the nodes}
case $cmd in
  start)
    first=${3:-7100}
    mkdir -p "$base"
    ports=()
    for i in 1 2 3 4 5 6; do
      port=$((first + i))
      ports+=("$port")
      d=$base/$port
      mkdir -p "$d"
      redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
        --cluster-config-file "$d/nodes.conf" --cluster-node-timeout 1000 --dir "$d" \
        --save '' --appendonly no --daemonize yes --pidfile "$d/pid" --logfile "$d/log"
    done
    for port in "${ports[@]}"; do
      for _ in $(seq 50); do
        redis-cli -p "$port" ping >/dev/null 2>&1 && break
        sleep 0.1
      done
    done
    redis-cli --cluster create $(printf '127.0.0.1:%s ' "${ports[@]}") --cluster-replicas 1 --cluster-yes >"$base/create.log"
    # Every node agrees: all 16384 slots served and the state ok.
    for port in "${ports[@]}"; do
      for _ in $(seq 100); do
        redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' && break
        sleep 0.1
      done
      redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' || {
        echo "node $port did not reach cluster_state:ok" >&2
        exit 1
      }
    done
    # Every master has its replica in sync (until then a dead master's slots would have no heir).
    for port in "${ports[@]}"; do
      redis-cli -p "$port" role | head -1 | grep -q master || continue
      for _ in $(seq 100); do
        redis-cli -p "$port" info replication | grep -q 'slave0:.*state=online' && break
        sleep 0.1
      done
      redis-cli -p "$port" info replication | grep -q 'slave0:.*state=online' || {
        echo "the replica of $port is not in sync" >&2
        exit 1
      }
    done
    printf 'redis://127.0.0.1:%s/\n' "${ports[@]}" | paste -sd, -
    ;;
  kill-node)
    port=${3:?which node (its port)}
    kill -9 "$(cat "$base/$port/pid")"
    ;;
  stop)
    for pidfile in "$base"/*/pid; do
      [ -f "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
    rm -rf "$base"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
