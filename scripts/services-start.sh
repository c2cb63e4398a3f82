#!/usr/bin/env bash
# Start the RabbitMQ and Redis packed by scripts/services-kit.sh, from a folder, as the current
# user, on a machine that has neither (the GPU device machine). Everything (programs, data, logs)
# stays under DIR; the shared libraries bundled in the kit are used by these programs only.
#   scripts/services-start.sh KIT.tar.xz DIR
# Ports: SERVICES_AMQP_PORT (5672), SERVICES_REDIS_PORT (6379), SERVICES_EPMD_PORT (4369),
# SERVICES_DIST_PORT (25672); change them to run beside services already there. Prints the AMQP
# and Redis URLs when both answer; `DIR/stop.sh` stops them.
set -euo pipefail
tarball=$1
dir=$2
amqp_port=${SERVICES_AMQP_PORT:-5672}
redis_port=${SERVICES_REDIS_PORT:-6379}
epmd_port=${SERVICES_EPMD_PORT:-4369}
dist_port=${SERVICES_DIST_PORT:-25672}

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
[ -d "$dir/kit" ] || tar -C "$dir" -xJf "$tarball"
kit=$dir/kit
rabbitmq_home=$(sed -n 's/^rabbitmq_home=//p' "$kit/KIT")
mkdir -p "$dir/var/redis" "$dir/var/rabbitmq/log" "$dir/var/rabbitmq/mnesia" "$dir/home"

# Only the services see the bundled libraries and the kit's Erlang.
services_env=(env "PATH=$kit/bin:$PATH" "LD_LIBRARY_PATH=$kit/lib" "OPENSSL_MODULES=$kit/lib/ossl-modules"
  "HOME=$dir/home" "ERL_EPMD_PORT=$epmd_port" "ERL_CRASH_DUMP=$dir/var/erl_crash.dump")

"${services_env[@]}" "$kit/bin/redis-server" --port "$redis_port" --bind 127.0.0.1 --save '' \
  --appendonly no --dir "$dir/var/redis" --daemonize yes --pidfile "$dir/var/redis/pid" \
  --logfile "$dir/var/redis/log"

echo "listeners.tcp.default = 127.0.0.1:$amqp_port" > "$dir/var/rabbitmq/rabbitmq.conf"
echo '[].' > "$dir/var/rabbitmq/enabled_plugins"
rabbit_env=("${services_env[@]}"
  "RABBITMQ_HOME=$kit/$rabbitmq_home"
  "RABBITMQ_NODENAME=kiln-kit@localhost"
  "RABBITMQ_DIST_PORT=$dist_port"
  "RABBITMQ_CONFIG_FILE=$dir/var/rabbitmq/rabbitmq.conf"
  "RABBITMQ_ENABLED_PLUGINS_FILE=$dir/var/rabbitmq/enabled_plugins"
  "RABBITMQ_MNESIA_BASE=$dir/var/rabbitmq/mnesia"
  "RABBITMQ_LOG_BASE=$dir/var/rabbitmq/log"
  "RABBITMQ_PID_FILE=$dir/var/rabbitmq/pid"
  "RABBITMQ_CONF_ENV_FILE=$dir/var/rabbitmq/rabbitmq-env.conf")
"${rabbit_env[@]}" "$kit/$rabbitmq_home/sbin/rabbitmq-server" > "$dir/var/rabbitmq/log/stdout" 2>&1 &
rabbit=$!

cat > "$dir/stop.sh" <<EOF
#!/bin/sh
$(printf '%q ' "${rabbit_env[@]}") "$kit/$rabbitmq_home/sbin/rabbitmqctl" -n kiln-kit@localhost stop >/dev/null 2>&1
$(printf '%q ' "${services_env[@]}") "$kit/bin/redis-cli" -p $redis_port shutdown nosave >/dev/null 2>&1
$(printf '%q ' "${services_env[@]}") "$kit/bin/epmd" -port $epmd_port -kill >/dev/null 2>&1
true
EOF
chmod +x "$dir/stop.sh"

deadline=$((SECONDS + 120))
while [ "$SECONDS" -lt "$deadline" ]; do
  if "${services_env[@]}" "$kit/bin/redis-cli" -p "$redis_port" ping 2>/dev/null | grep -q PONG &&
    "${rabbit_env[@]}" "$kit/$rabbitmq_home/sbin/rabbitmq-diagnostics" -n kiln-kit@localhost -q check_port_listener "$amqp_port" >/dev/null 2>&1; then
    echo "amqp://guest:guest@127.0.0.1:$amqp_port/%2f redis://127.0.0.1:$redis_port/"
    exit 0
  fi
  kill -0 "$rabbit" 2>/dev/null || break
  sleep 1
done
echo "services did not start (RabbitMQ exited, or 120 s passed); logs under $dir/var" >&2
tail -20 "$dir/var/rabbitmq/log/stdout" >&2 || true
"$dir/stop.sh"
exit 1
