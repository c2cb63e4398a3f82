#!/usr/bin/env bash
# The fault drills' long form (RELIABILITY.md, "Fault drills"): the drills of
# tests/integration/drills.rs with N requests each (DRILL_REQUESTS), one drill at a time, then one
# table row per drill from the `DRILL <name>:` line it prints. The log goes to target/drills-*.log.
#   scripts/drills.sh [--requests N] [DRILL...]
#   DRILL: kill9 broker_restart redis_restart broker_cut redis_cut sigterm memory (default: all)
#   N: requests per drill (default 600); the memory drill floods N/15 (at least 8) 2048 px requests.
# Needs what the integration tests need: RabbitMQ on 5672 and Redis on 6379 (scripts/services.sh),
# rabbitmq-server and redis-server installed (the drills that restart them start their own),
# ONNX Runtime (scripts/setup.sh). About 15 minutes for all seven at 600 on 2 vCPUs.
set -euo pipefail
cd "$(dirname "$0")/.."

all=(kill9 broker_restart redis_restart broker_cut redis_cut sigterm memory)
requests=600
drills=()
while [ $# -gt 0 ]; do
  case $1 in
    --requests)
      requests=${2:?--requests needs a number}
      shift 2
      ;;
    -h | --help)
      sed -n '2,10p' "$0"
      exit 0
      ;;
    *)
      case " ${all[*]} " in
        *" $1 "*) drills+=("$1") ;;
        *)
          echo "unknown drill $1 (one of: ${all[*]})" >&2
          exit 2
          ;;
      esac
      shift
      ;;
  esac
done
[ ${#drills[@]} -gt 0 ] || drills=("${all[@]}")

filters=()
for d in "${drills[@]}"; do filters+=("drills::drill_$d"); done
mkdir -p target
log=target/drills-$(date +%Y%m%d-%H%M%S).log
status=0
DRILL_REQUESTS=$requests cargo nextest run --test integration --no-capture --no-fail-fast "${filters[@]}" 2>&1 |
  tee "$log" || status=$?

echo
echo "Fault drills, $requests requests each ($(date -u +%Y-%m-%d), $(nproc) CPUs; log: $log)"
echo
echo "| drill | published | answered | lost | answered twice (same message_id) | charged twice | peak RSS MiB per worker | bound MiB | details |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
# DRILL kill9: published P answered A lost L doubled D (same message_id S) charged_twice C
#   peak_rss_mb a/b bound_mb B | details...
grep '^DRILL ' "$log" | awk '{
  name = $2; sub(/:$/, "", name); same = $13; sub(/\)$/, "", same)
  details = ""; for (i = 21; i <= NF; i++) details = details (i > 21 ? " " : "") $i
  printf "| %s | %s | %s | %s | %s (%s) | %s | %s | %s | %s |\n", name, $4, $6, $8, $10, same, $15, $17, $19, details
}'
exit "$status"
