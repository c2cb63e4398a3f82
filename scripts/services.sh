#!/usr/bin/env bash
# Make sure RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) are running; start them if not.
# Uses the same commands as the machines kiln is developed and tested on (Debian packages).
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 120); do
    port_open "$port" && return 0
    sleep 0.5
  done
  echo "$name did not come up on 127.0.0.1:$port" >&2
  return 1
}

if ! port_open 5672; then
  echo "starting RabbitMQ ..." >&2
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ
fi
# The port opens before the broker finishes booting; wait until it answers.
timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true

if ! port_open 6379; then
  echo "starting Redis ..." >&2
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 6379 Redis
fi
