#!/usr/bin/env bash
# Checks of everything that ships kiln, run by scripts/test.sh (and so by CI) before the Rust tests.
# No Docker engine runs here, so the image recipe is checked by running its one build step,
# docker/build-rootfs.sh, natively and testing the filesystem it lays out.
#
#  1. hadolint on docker/Dockerfile; shellcheck on the scripts that build and check the images.
#  2. `docker compose config` accepts docker/compose.yaml (default and gpu profile); every file it
#     mounts or builds from exists; `promtool check config` on the local Prometheus config.
#  3. k8s: the generated PrometheusRule is in step with observability/prometheus/kiln-alerts.yml;
#     both overlays render (kustomize, in kubectl 1.35); every manifest validates against the
#     Kubernetes schemas or, for ServiceMonitor, PrometheusRule, ScaledObject and
#     TriggerAuthentication, the KEDA / prometheus-operator CRD schemas, plus kiln's own invariants
#     (scripts/validate_k8s.py); a deliberately broken render must be rejected.
#  4. `promtool check rules` on the alert rules, as written and as rendered into the PrometheusRule.
#  5. The image layout: docker/build-rootfs.sh --profile dev (reusing the debug build, no second,
#     release build) into a temporary folder; files, checksums, shared libraries, `kiln --help`;
#     the health check script against a stub server; then, with the rootfs mounted at /opt/kiln
#     (private mount namespace), the layout's kiln and its own config start a worker on the local
#     broker (models loaded and warmed up on the bundled ONNX Runtime), serve one real request, and
#     drain and exit 0 on SIGTERM. The k8s ConfigMap's kiln.toml is loaded by that same binary.
#  6. The GPU image's layout (--flavor cuda): onnxruntime-gpu's CUDA provider is in place, needs only
#     what the CUDA 13 + cuDNN 9 base image provides, and the worker refuses to start without a GPU.
#
# Tools come from scripts/deploy-tools.sh (cached outside the checkout; first run ~20 s).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
started=$SECONDS
step() { printf '\n== %s\n' "$*" >&2; }

tools=$(scripts/deploy-tools.sh)
export PATH="$tools/bin:$PATH"
py=$tools/venv/bin/python
work=$(mktemp -d)
worker=
cleanup() {
  [ -z "$worker" ] || { kill -TERM "$worker" 2>/dev/null || true; wait "$worker" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT

# 1 ---------------------------------------------------------------------------------------------
step "hadolint $(hadolint --version | grep -o '[0-9][0-9.]*' | head -1): docker/Dockerfile"
hadolint docker/Dockerfile
echo "hadolint: no findings" >&2
step "shellcheck $(shellcheck --version | sed -n 's/^version: //p'): the deployment scripts"
shellcheck docker/build-rootfs.sh docker/healthcheck.sh scripts/check-deploy.sh scripts/deploy-tools.sh scripts/render-k8s.sh \
  scripts/gpu-kit.sh scripts/gpu-check.sh scripts/services-kit.sh scripts/services-start.sh scripts/services-check.sh
echo "shellcheck: no findings" >&2

# 2 ---------------------------------------------------------------------------------------------
if command -v docker >/dev/null; then
  compose() { DOCKER_CONFIG="$tools/docker" docker compose "$@"; }
else
  compose() { docker-compose "$@"; }
fi
step "compose $(compose version --short): docker/compose.yaml"
compose -f docker/compose.yaml config --quiet
compose -f docker/compose.yaml --profile gpu config --format json > "$work/compose.json"
"$py" - "$work/compose.json" docker/Dockerfile <<'PY'
import json, re, sys
from pathlib import Path
project = json.load(open(sys.argv[1]))
targets = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", Path(sys.argv[2]).read_text(), re.M | re.I))
problems = []
for name, service in project["services"].items():
    for volume in service.get("volumes", []):
        if volume["type"] == "bind" and not Path(volume["source"]).exists():
            problems.append(f"{name}: mounts {volume['source']}, which does not exist")
    build = service.get("build")
    if build:
        dockerfile = Path(build["context"]) / build["dockerfile"]
        if not dockerfile.is_file():
            problems.append(f"{name}: no Dockerfile at {dockerfile}")
        if build.get("target") not in targets:
            problems.append(f"{name}: build target {build.get('target')!r} is not a stage of {dockerfile}")
expected = {"rabbitmq", "redis", "kiln", "kiln-gpu", "prometheus", "grafana"}
if set(project["services"]) != expected:
    problems.append(f"services are {sorted(project['services'])}, expected {sorted(expected)}")
gpu = project["services"].get("kiln-gpu", {})
devices = gpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
if gpu.get("profiles") != ["gpu"] or not any("gpu" in d.get("capabilities", []) for d in devices):
    problems.append("kiln-gpu must be in the gpu profile and reserve a GPU")
if problems:
    sys.exit("docker/compose.yaml:\n  " + "\n  ".join(problems))
print(f"compose: {len(project['services'])} services, every mounted file and build target exists", file=sys.stderr)
PY
promtool check config --syntax-only docker/prometheus/prometheus.yml >&2

# 3 ---------------------------------------------------------------------------------------------
step "k8s: kubectl $(kubectl version --client -o json | "$py" -c 'import json,sys; v=json.load(sys.stdin); print(v["clientVersion"]["gitVersion"], "kustomize", v["kustomizeVersion"])')"
scripts/render-k8s.sh --check
echo "k8s/base/prometheusrule.yaml is in step with observability/prometheus/kiln-alerts.yml" >&2
for overlay in cpu gpu; do
  KUBECTL="$tools/bin/kubectl" scripts/render-k8s.sh "$overlay" > "$work/k8s-$overlay.yaml"
  "$py" scripts/validate_k8s.py --overlay "$overlay" --rules observability/prometheus/kiln-alerts.yml \
    --secret-example k8s/secret.example.yaml "$work/k8s-$overlay.yaml" >&2
done
# The validator must catch what it claims to: a misspelt CRD field, a grace period shorter than the
# drain, a missing GPU limit, a missing queue trigger. Each must be reported.
sed -e 's/stabilizationWindowSeconds: 300/stabilizationWindowSecnds: 300/' \
    -e 's/terminationGracePeriodSeconds: 45/terminationGracePeriodSeconds: 30/' \
    -e 's|nvidia.com/gpu: 1|nvidia.com/gpus: 1|' \
    -e 's/queueName: kiln.requests.pro$/queueName: kiln.requests.premium/' \
    "$work/k8s-gpu.yaml" > "$work/k8s-broken.yaml"
if "$py" scripts/validate_k8s.py --overlay gpu --rules observability/prometheus/kiln-alerts.yml \
    --secret-example k8s/secret.example.yaml "$work/k8s-broken.yaml" 2> "$work/broken.log"; then
  echo "the k8s validator accepted a broken render" >&2; exit 1
fi
for expected in stabilizationWindowSecnds terminationGracePeriodSeconds nvidia.com/gpu kiln.requests.premium; do
  grep -q "$expected" "$work/broken.log" || { cat "$work/broken.log" >&2; echo "the k8s validator missed: $expected" >&2; exit 1; }
done
echo "k8s validator: a broken render is rejected with all 4 planted faults reported" >&2

# 4 ---------------------------------------------------------------------------------------------
step "promtool $(promtool --version 2>&1 | head -1 | awk '{print $3}'): alert rules"
"$py" - "$work/k8s-gpu.yaml" "$work/rendered-rules.yml" <<'PY'
import sys, yaml
(rule,) = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"]
yaml.safe_dump(rule["spec"], open(sys.argv[2], "w"), sort_keys=False)
PY
promtool check rules observability/prometheus/kiln-alerts.yml "$work/rendered-rules.yml" >&2

# 5 ---------------------------------------------------------------------------------------------
step "image layout: docker/build-rootfs.sh --flavor cpu --profile dev"
rootfs=$work/rootfs
docker/build-rootfs.sh --flavor cpu --profile dev "$rootfs" 2> "$work/rootfs.log" || { cat "$work/rootfs.log" >&2; exit 1; }
kiln=$rootfs/opt/kiln/bin/kiln
for f in opt/kiln/bin/kiln opt/kiln/bin/kiln-healthcheck opt/kiln/runtime/libonnxruntime.so.1.31.1 \
         opt/kiln/runtime/SHA256SUMS opt/kiln/BUILD etc/kiln/kiln.toml \
         opt/kiln/models/multistyle26/manifest.toml opt/kiln/models/arbitrary-style/manifest.toml \
         opt/kiln/models/sd-tiny-random/unet/model.onnx opt/kiln/models/sd-tiny-random/tokenizer/vocab.json; do
  [ -s "$rootfs/$f" ] || { echo "layout: /$f is missing or empty" >&2; exit 1; }
done
[ -x "$kiln" ] && [ -x "$rootfs/opt/kiln/bin/kiln-healthcheck" ] || { echo "layout: bin/ is not executable" >&2; exit 1; }
(cd "$rootfs/opt/kiln/runtime" && sha256sum --quiet --check SHA256SUMS) || { echo "layout: ONNX Runtime checksums differ" >&2; exit 1; }
if ldd "$kiln" | grep -q 'not found'; then ldd "$kiln" >&2; echo "layout: kiln needs a library the image lacks" >&2; exit 1; fi
# Every path the image's config names lies inside the layout.
"$py" - "$rootfs" <<'PY'
import sys, tomllib
from pathlib import Path
rootfs = Path(sys.argv[1])
config = tomllib.loads((rootfs / "etc/kiln/kiln.toml").read_text())
paths = [config["inference"]["runtime_library"], config["models"]["dir"]]
paths += [f"{config['models']['dir']}/{m}/manifest.toml" for m in ("multistyle26", "arbitrary-style")]
missing = [p for p in paths if not p.startswith("/opt/kiln/") or not (rootfs / p.lstrip("/")).exists()]
if missing or config["inference"]["execution_provider"] != "cpu":
    sys.exit(f"layout: etc/kiln/kiln.toml names {missing or 'a wrong provider'}")
PY
# BUILD says what went in.
expected_build="flavor=cpu
cargo_profile=dev
onnxruntime=$(cat runtime/onnxruntime-1.31.1-cpu/SOURCE)
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
[ "$(cat "$rootfs/opt/kiln/BUILD")" = "$expected_build" ] \
  || { diff <(echo "$expected_build") "$rootfs/opt/kiln/BUILD" >&2; echo "layout: /opt/kiln/BUILD is wrong" >&2; exit 1; }
"$kiln" --help > "$work/help.txt"
grep -q 'worker' "$work/help.txt" || { echo "layout: kiln --help does not list the worker" >&2; exit 1; }
echo "layout: $(cd "$rootfs" && find . -type f | wc -l) files, $(du -sh "$rootfs" | cut -f1); $("$kiln" --version)" >&2

# The health check script: 0 on 200, non-zero on 503 and on a closed port.
"$py" - "$work/ports" <<'PY' &
import http.server, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 200 if self.server.server_port == ok.server_port and self.path == "/healthz" else 503
        self.send_response(code); self.end_headers(); self.wfile.write(b"x")
    def log_message(self, *a): pass
class S(http.server.HTTPServer):
    def handle_error(self, *a): pass  # the check hangs up after the status line
ok = S(("127.0.0.1", 0), H); bad = S(("127.0.0.1", 0), H)
open(sys.argv[1], "w").write(f"{ok.server_port} {bad.server_port}\n")
threading.Thread(target=bad.serve_forever, daemon=True).start()
threading.Timer(60, lambda: (ok.shutdown(), bad.shutdown())).start()
ok.serve_forever()
PY
stub=$!
for _ in $(seq 1 100); do [ -s "$work/ports" ] && break; sleep 0.1; done
read -r ok_port bad_port < "$work/ports"
healthcheck=$rootfs/opt/kiln/bin/kiln-healthcheck
KILN_HEALTHCHECK_PORT=$ok_port "$healthcheck" || { echo "healthcheck: failed on a 200" >&2; exit 1; }
KILN_HTTP__BIND=0.0.0.0:$ok_port "$healthcheck" || { echo "healthcheck: ignored KILN_HTTP__BIND" >&2; exit 1; }
if KILN_HEALTHCHECK_PORT=$bad_port "$healthcheck" 2>/dev/null; then echo "healthcheck: passed on a 503" >&2; exit 1; fi
kill "$stub"; wait "$stub" 2>/dev/null || true
if KILN_HEALTHCHECK_PORT=$ok_port "$healthcheck" 2>/dev/null; then echo "healthcheck: passed with nothing listening" >&2; exit 1; fi
echo "healthcheck: 200 passes; 503 and a closed port fail" >&2

# The layout's kiln, its config and its paths, as in the image: /opt/kiln is the layout (bind mount
# in a private mount namespace; the host's /opt is untouched).
scripts/services.sh
# shellcheck disable=SC2016  # expanded by the inner bash
mount_layout='mount -t tmpfs tmpfs /opt && mkdir /opt/kiln && mount --bind "$0/opt/kiln" /opt/kiln && exec "$@"'
in_image() { unshare --mount --propagation private -- bash -c "$mount_layout" "$rootfs" "$@"; }
in_image true || { echo "layout: cannot mount the rootfs at /opt/kiln (unshare needs root)" >&2; exit 1; }
# The image's own settings file, by flag as in its ENTRYPOINT (KILN_CONFIG is not usable: the
# settings loader reads every KILN_* variable as a setting, and rejects `config`).
config=$rootfs/etc/kiln/kiln.toml
grep -q '^ENTRYPOINT \["/opt/kiln/bin/kiln", "--config", "/etc/kiln/kiln.toml"\]' docker/Dockerfile \
  || { echo "docker/Dockerfile: the ENTRYPOINT must pass --config /etc/kiln/kiln.toml" >&2; exit 1; }
# A topology and key prefix of its own: declared idempotently, shared by nothing else.
export KILN_AMQP__TOPOLOGY__PREFIX=kiln-deploy-check KILN_RATE_LIMIT__KEY_PREFIX=kiln-deploy-check

in_image /opt/kiln/bin/kiln --config "$root/k8s/base/kiln.toml" models > "$work/k8s-models.txt" \
  || { echo "k8s/base/kiln.toml is not a valid kiln configuration" >&2; exit 1; }
echo "k8s/base/kiln.toml: loads, serves $(grep -c '^[^[:space:]]' "$work/k8s-models.txt") models" >&2

# Once the worker serves HTTP ([http] bind), the health check must pass against it too.
http_port=
if KILN_HTTP__BIND=127.0.0.1:0 in_image /opt/kiln/bin/kiln --config "$config" models >/dev/null 2>"$work/http-probe.log"; then
  http_port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  export KILN_HTTP__BIND=127.0.0.1:$http_port
else
  grep -qF "unknown field \`http\`" "$work/http-probe.log" || { cat "$work/http-probe.log" >&2; exit 1; }
  echo "this kiln has no [http] settings yet: /healthz on the worker is not checked" >&2
fi

# Started directly (not through the function) so that $! is the worker itself: unshare and bash exec.
unshare --mount --propagation private -- bash -c "$mount_layout" "$rootfs" /opt/kiln/bin/kiln --config "$config" worker \
  > "$work/worker.log" 2>&1 &
worker=$!
for _ in $(seq 1 1200); do
  grep -q '"worker ready"\|worker ready' "$work/worker.log" && break
  kill -0 "$worker" 2>/dev/null || { cat "$work/worker.log" >&2; echo "layout: the worker exited before it was ready" >&2; exit 1; }
  sleep 0.1
done
grep -q 'worker ready' "$work/worker.log" || { cat "$work/worker.log" >&2; echo "layout: no 'worker ready' in 120 s" >&2; exit 1; }
grep 'worker ready' "$work/worker.log" | grep -q 'multistyle26' || { cat "$work/worker.log" >&2; exit 1; }
# The ONNX Runtime the worker runs on is the layout's, not the checkout's runtime/.
grep -q ' /opt/kiln/runtime/libonnxruntime.so.1.31.1$' "/proc/$worker/maps" \
  || { grep onnxruntime "/proc/$worker/maps" >&2; echo "layout: the worker did not load /opt/kiln/runtime's ONNX Runtime" >&2; exit 1; }
echo "worker: ready on /opt/kiln/runtime/libonnxruntime.so.1.31.1, $(grep -o '"provider":"[a-z]*"' "$work/worker.log" | head -1), $(grep -o '"startup_seconds":[0-9.]*' "$work/worker.log" | head -1)" >&2
if [ -n "$http_port" ]; then
  for path in /healthz /readyz /metrics; do
    KILN_HEALTHCHECK_PORT=$http_port "$healthcheck" "$path" \
      || { cat "$work/worker.log" >&2; echo "layout: $path failed on the worker" >&2; exit 1; }
  done
  echo "worker: /healthz, /readyz and /metrics answer 200 (kiln-healthcheck)" >&2
fi
# One real request through the broker, rendered by the layout's ONNX Runtime and models.
"$kiln" --config "$config" submit samples/astronaut.jpg --style 7 --size 256 --user "deploy-check-$$-$RANDOM" \
  --timeout-secs 60 --out "$work/out.png" > /dev/null 2> "$work/submit.log" \
  || { cat "$work/submit.log" "$work/worker.log" >&2; echo "layout: the request failed" >&2; exit 1; }
"$py" - "$work/out.png" <<'PY'
import sys
head = open(sys.argv[1], "rb").read(24)
width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
if head[:8] != b"\x89PNG\r\n\x1a\n" or max(width, height) != 256:
    sys.exit(f"layout: the reply is not a PNG of longer side 256 ({head[:8]!r}, {width}x{height})")
print(f"request: {width}x{height} PNG from the layout's models", file=sys.stderr)
PY
kill -TERM "$worker"
status=0
if ! timeout 40 tail --pid="$worker" -f /dev/null; then
  kill -KILL "$worker" 2>/dev/null || true
  cat "$work/worker.log" >&2; echo "layout: the worker was still running 40 s after SIGTERM" >&2; exit 1
fi
wait "$worker" || status=$?
worker=
[ "$status" = 0 ] || { cat "$work/worker.log" >&2; echo "layout: the worker exited $status on SIGTERM" >&2; exit 1; }
grep -q 'worker stopped' "$work/worker.log" || { cat "$work/worker.log" >&2; echo "layout: no clean stop" >&2; exit 1; }
echo "worker: drained and exited 0 on SIGTERM" >&2

# The GPU layout, as far as a machine without a GPU can tell: the onnxruntime-gpu libraries are
# in place, the CUDA provider needs nothing but the CUDA 13 libraries the nvidia/cuda base image
# ships (and the driver's libcuda), and the layout's worker, finding no CUDA here, refuses to start
# (no silent CPU fallback) naming the provider in /opt/kiln/runtime.
step "GPU image layout: docker/build-rootfs.sh --flavor cuda --no-build (no GPU here)"
rootfs=$work/rootfs-cuda
docker/build-rootfs.sh --flavor cuda --profile dev --no-build "$rootfs" 2> "$work/rootfs-cuda.log" || { cat "$work/rootfs-cuda.log" >&2; exit 1; }
provider=$rootfs/opt/kiln/runtime/libonnxruntime_providers_cuda.so
if ! { [ -s "$provider" ] && grep -q '^execution_provider = "cuda"$' "$rootfs/etc/kiln/kiln.toml" \
       && grep -q '^onnxruntime=onnxruntime-gpu==1.31.1 ' "$rootfs/opt/kiln/BUILD"; }; then
  echo "GPU layout: no CUDA provider, or not configured for cuda" >&2; exit 1
fi
# What the nvidia/cuda:13.x-cudnn-runtime image and the driver provide, and glibc/libstdc++.
unexpected=$(objdump -p "$provider" | awk '/NEEDED/ {print $2}' \
  | grep -Ev '^(libcublasLt\.so\.13|libcublas\.so\.13|libcurand\.so\.10|libcufft\.so\.12|libcudart\.so\.13|libcudnn[a-z_]*\.so\.9|libcuda\.so\.1|libonnxruntime_providers_shared\.so|lib(c|m|dl|rt|pthread|gcc_s|stdc\+\+)\.so\.[0-9]+|ld-linux-x86-64\.so\.2)$' || true)
[ -z "$unexpected" ] || { echo "GPU layout: the CUDA provider needs libraries the base image lacks: $unexpected" >&2; exit 1; }
if unshare --mount --propagation private -- bash -c "$mount_layout" "$rootfs" \
     timeout 60 /opt/kiln/bin/kiln --config "$rootfs/etc/kiln/kiln.toml" worker > "$work/worker-cuda.log" 2>&1; then
  echo "GPU layout: the worker started without CUDA" >&2; exit 1
fi
grep -q 'CUDA execution provider cannot start.*/opt/kiln/runtime/libonnxruntime_providers_cuda.so' "$work/worker-cuda.log" \
  || { cat "$work/worker-cuda.log" >&2; echo "GPU layout: the worker did not fail on the layout's CUDA provider" >&2; exit 1; }
echo "GPU layout: onnxruntime-gpu in place; its CUDA provider needs only $(objdump -p "$provider" | awk '/NEEDED/ && /cu/ {printf "%s ", $2}')" >&2
echo "GPU layout: without a GPU the worker refuses to start, naming /opt/kiln/runtime/libonnxruntime_providers_cuda.so" >&2

echo >&2
echo "check-deploy: all checks passed in $((SECONDS - started)) s" >&2
