#!/usr/bin/env bash
# RabbitMQ and Redis with TLS listeners on this machine, from the Debian packages, for the TLS tests
# (tests/integration/tls.rs) and for trying the settings by hand. A throwaway CA signs a server
# certificate (localhost, 127.0.0.1) and a client certificate; a second CA signs nothing the
# services know (a wrong `ca_file`). Both services require a client certificate from the CA.
#   RabbitMQ: node kt1@localhost, AMQP 5691 (plain), AMQPS 5692, distribution 25691, no plugins
#   Redis:    TLS only on 6392 (no plain port)
# Certificates, data and logs under DIR.
#   scripts/tls-services.sh start DIR   prints what a client needs, as shell assignments
#   scripts/tls-services.sh stop DIR    stops both and removes DIR
set -euo pipefail
cmd=${1:?usage: tls-services.sh start|stop DIR}
base=${2:?a folder for the certificates, data and logs}
export HOME=/var/lib/rabbitmq # where the Erlang cookie the CLI shares with the node is
node=kt1@localhost
amqp_port=5691
amqps_port=5692
dist_port=25691
rediss_port=6392

# A CA: key and self-signed certificate, DIR/NAME.key and DIR/NAME.pem.
make_ca() {
  openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=kiln test $1" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign -keyout "$base/$1.key" -out "$base/$1.pem" 2>/dev/null
}

# A certificate NAME signed by the CA: DIR/NAME.key (PKCS#8) and DIR/NAME.pem. $2: extensions.
make_cert() {
  local name=$1 extensions=$2
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$name" \
    -keyout "$base/$name.key" -out "$base/$name.csr" 2>/dev/null
  printf '%s\n' "$extensions" >"$base/$name.ext"
  openssl x509 -req -in "$base/$name.csr" -CA "$base/ca.pem" -CAkey "$base/ca.key" -CAcreateserial \
    -days 2 -extfile "$base/$name.ext" -out "$base/$name.pem" 2>/dev/null
}

case $cmd in
  start)
    mkdir -p "$base"
    make_ca ca
    make_ca other-ca
    make_cert server "$(printf '%s\n' 'basicConstraints=CA:FALSE' 'extendedKeyUsage=serverAuth' \
      'subjectAltName=DNS:localhost,IP:127.0.0.1')"
    make_cert client "$(printf '%s\n' 'basicConstraints=CA:FALSE' 'extendedKeyUsage=clientAuth')"
    # The services read their keys as another user on some systems; these are throwaway keys.
    chmod 644 "$base"/*.key

    # Redis first: it is up in milliseconds, while the broker boots.
    mkdir -p "$base/redis"
    redis-server --port 0 --tls-port "$rediss_port" --bind 127.0.0.1 \
      --tls-cert-file "$base/server.pem" --tls-key-file "$base/server.key" \
      --tls-ca-cert-file "$base/ca.pem" --tls-auth-clients yes \
      --dir "$base/redis" --save '' --appendonly no --daemonize yes \
      --pidfile "$base/redis/pid" --logfile "$base/redis/log"

    d=$base/rabbitmq
    mkdir -p "$d/mnesia" "$d/log"
    echo "[]." >"$d/enabled_plugins"
    cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$amqp_port
listeners.ssl.default = 127.0.0.1:$amqps_port
ssl_options.cacertfile = $base/ca.pem
ssl_options.certfile = $base/server.pem
ssl_options.keyfile = $base/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
EOF
    env RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$amqp_port" RABBITMQ_DIST_PORT="$dist_port" \
      RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
      RABBITMQ_PID_FILE="$d/pid" RABBITMQ_FEATURE_FLAGS_FILE="$d/feature_flags" \
      RABBITMQ_PLUGINS_EXPAND_DIR="$d/plugins-expand" RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
      setsid /usr/lib/rabbitmq/bin/rabbitmq-server >"$d/out.log" 2>&1 &

    for _ in $(seq 50); do
      redis-cli --tls -p "$rediss_port" --cacert "$base/ca.pem" --cert "$base/client.pem" \
        --key "$base/client.key" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
    redis-cli --tls -p "$rediss_port" --cacert "$base/ca.pem" --cert "$base/client.pem" \
      --key "$base/client.key" ping >/dev/null || {
      echo "Redis did not start on TLS port $rediss_port (see $base/redis/log)" >&2
      exit 1
    }
    for _ in $(seq 90); do
      rabbitmqctl -n "$node" -q await_startup >/dev/null 2>&1 && break
      sleep 1
    done
    rabbitmqctl -n "$node" -q await_startup >/dev/null || {
      echo "RabbitMQ did not start (see $d/out.log)" >&2
      exit 1
    }
    cat <<EOF
AMQP_URL=amqp://guest:guest@127.0.0.1:$amqp_port/%2f
AMQPS_URL=amqps://guest:guest@localhost:$amqps_port/%2f
REDISS_URL=rediss://localhost:$rediss_port/
CA_FILE=$base/ca.pem
OTHER_CA_FILE=$base/other-ca.pem
CERT_FILE=$base/client.pem
KEY_FILE=$base/client.key
EOF
    ;;
  stop)
    rabbitmqctl -n "$node" -q stop >/dev/null 2>&1 || true
    [ -f "$base/redis/pid" ] && kill -9 "$(cat "$base/redis/pid")" 2>/dev/null || true
    rm -rf "$base"
    ;;
  *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
