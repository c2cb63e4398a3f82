"""Validate kiln's rendered Kubernetes manifests (scripts/check-deploy.sh runs this).

    validate_k8s.py --overlay cpu|gpu --rules observability/prometheus/kiln-alerts.yml RENDERED.yaml

1. Schemas. Built-in kinds: kubernetes-validate, strict (unknown fields are errors), against the
   oldest Kubernetes kiln supports (1.30: preStop `sleep`) and the newest the package knows.
   Custom resources (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication): the
   pydantic models that cloudcoil-models-keda / -prometheus-operator generate from the KEDA and
   prometheus-operator CRD schemas (types, enums, required fields), plus a walk that rejects any
   field those models do not have (the models themselves ignore unknown fields). Any other kind is
   an error: nothing goes unvalidated.
2. What kiln relies on, which no schema can say: the grace period covers the drain, probes and the
   metrics port line up, selectors select the workers, KEDA watches every request queue, the
   PrometheusRule is the rules file, the Secret keys exist in the shipped example.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
import typing
from pathlib import Path

import kubernetes_validate
import pydantic
import yaml
from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
CUSTOM = {
    ("keda.sh/v1alpha1", "ScaledObject"): keda.ScaledObject,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): keda.TriggerAuthentication,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): prometheus_operator.ServiceMonitor,
    ("monitoring.coreos.com/v1", "PrometheusRule"): prometheus_operator.PrometheusRule,
}
BUILTIN = {
    ("v1", "ConfigMap"), ("v1", "Service"), ("v1", "Secret"), ("apps/v1", "Deployment"),
    ("policy/v1", "PodDisruptionBudget"), ("networking.k8s.io/v1", "NetworkPolicy"),
}
REQUEST_QUEUES = {"kiln.requests"} | {f"kiln.requests.{t}" for t in ("free", "plus", "pro", "enterprise")}
SECRET_KEYS = {"KILN_AMQP__URL": "amqp-url", "KILN_RATE_LIMIT__REDIS_URL": "redis-url"}
HTTP_PORT = 9464

errors: list[str] = []


def fail(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")


def unknown_fields(model: type, data: object, path: str) -> list[str]:
    """Fields in `data` that `model` (a pydantic model, or a type built from them) does not declare."""
    found: list[str] = []
    origin = typing.get_origin(model)
    if isinstance(model, type) and issubclass(model, pydantic.BaseModel):
        if not isinstance(data, dict):
            return found
        fields = {(f.alias or name): f for name, f in model.model_fields.items()}
        for key, value in data.items():
            if key not in fields:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(fields[key].annotation, value, f"{path}.{key}")
    elif origin in (list, typing.List) and isinstance(data, list):
        (item,) = typing.get_args(model) or (typing.Any,)
        for i, value in enumerate(data):
            found += unknown_fields(item, value, f"{path}[{i}]")
    elif origin in (dict, typing.Dict) and isinstance(data, dict):
        args = typing.get_args(model)
        for key, value in data.items():
            found += unknown_fields(args[1] if len(args) == 2 else typing.Any, value, f"{path}.{key}")
    else:
        for arg in typing.get_args(model):  # Optional[...], Union[...], Annotated[...]
            if arg is not type(None):
                found += unknown_fields(arg, data, path)
    return found


def validate_schema(doc: dict, where: str) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CUSTOM:
        model = CUSTOM[key]
        try:
            model.model_validate(doc)
        except pydantic.ValidationError as e:
            fail(where, f"does not match the {key[1]} CRD schema: {e}")
        for field in unknown_fields(model, doc, key[1]):
            fail(where, f"unknown field {field} (not in the {key[1]} CRD schema)")
    elif key in BUILTIN:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(where, f"invalid for Kubernetes {version}: {e.message} at {'.'.join(map(str, e.path))}")
    else:
        fail(where, f"{key[0]} {key[1]} is neither a known Kubernetes kind nor an allow-listed CRD")


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    if len(found) != 1:
        fail(kind, f"expected exactly one, found {len(found)}")
        return {}
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_kiln(docs: list[dict], overlay: str, rules_file: Path, secret_example: Path) -> None:
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    monitor, pdb = one(docs, "ServiceMonitor"), one(docs, "PodDisruptionBudget")
    scaled, auth = one(docs, "ScaledObject"), one(docs, "TriggerAuthentication")
    policy, rule = one(docs, "NetworkPolicy"), one(docs, "PrometheusRule")
    if not (deployment and service and monitor and pdb and scaled and auth and policy and rule):
        return
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (container,) = [c for c in pod["spec"]["containers"] if c["name"] == "kiln"]
    env = {e["name"]: e for e in container.get("env", [])}

    # Settings: the ConfigMap's kiln.toml, mounted where `--config` points.
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    args = container.get("args", [])
    config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else ""
    if "worker" not in args:
        fail("Deployment", f"the container must run `kiln worker`, runs {container.get('command')} {args}")
    mount = mounts.get(str(Path(config_path).parent))
    settings: dict = {}
    if not mount:
        fail("Deployment", f"nothing is mounted at the folder of --config ({config_path!r})")
    else:
        cm_name = volumes[mount["name"]].get("configMap", {}).get("name")
        text = config_maps.get(cm_name, {}).get("data", {}).get(Path(config_path).name)
        if text is None:
            fail("Deployment", f"--config {config_path} is not a key of ConfigMap {cm_name}")
        else:
            settings = tomllib.loads(text)

    # The drain fits in the grace period: preStop, then SIGTERM and at most shutdown_grace_ms.
    grace_ms = settings.get("worker", {}).get("shutdown_grace_ms", 25000)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    termination = pod["spec"].get("terminationGracePeriodSeconds", 30)
    if termination < pre_stop + grace_ms / 1000 + 10:
        fail("Deployment", f"terminationGracePeriodSeconds {termination} leaves under 10 s after preStop "
             f"({pre_stop} s) and the worker's drain (worker.shutdown_grace_ms {grace_ms} ms)")

    # Probes and the metrics port.
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    if ports.get("metrics") != HTTP_PORT:
        fail("Deployment", f"container port `metrics` must be {HTTP_PORT}, is {ports.get('metrics')}")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        get = container.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") not in ("metrics", HTTP_PORT):
            fail("Deployment", f"{probe} must GET {path} on port metrics, is {get}")

    # Hardening.
    sc, psc = container.get("securityContext", {}), pod["spec"].get("securityContext", {})
    if not (psc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False):
        fail("Deployment", "must run as non-root, with a read-only root filesystem and no privilege escalation")
    if "/tmp" not in mounts:
        fail("Deployment", "/tmp must be a writable volume (the root filesystem is read-only)")

    # Credentials from the Secret, with keys the shipped example has.
    example = yaml.safe_load(secret_example.read_text())
    example_keys = set(example.get("stringData", {})) | set(example.get("data", {}))
    for var, key in SECRET_KEYS.items():
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("name") != example["metadata"]["name"] or ref.get("key") != key:
            fail("Deployment", f"{var} must come from Secret {example['metadata']['name']}, key {key}")
        if key not in example_keys:
            fail(str(secret_example), f"has no key {key}")
    for s in auth["spec"].get("secretTargetRef", []):
        if s["name"] != example["metadata"]["name"] or s["key"] not in example_keys:
            fail("TriggerAuthentication", f"reads {s['name']}/{s['key']}, which the example Secret does not have")

    # Selectors select the workers; the scrape path exists.
    if not selects(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        fail("Deployment", "selector does not match its own pods")
    if not selects(service["spec"].get("selector", {}), pod_labels):
        fail("Service", "does not select the worker pods")
    if not any(p.get("name") == "metrics" and p["port"] == HTTP_PORT for p in service["spec"]["ports"]):
        fail("Service", f"needs a port named metrics on {HTTP_PORT}")
    if not selects(monitor["spec"]["selector"].get("matchLabels", {}), service["metadata"].get("labels", {})):
        fail("ServiceMonitor", "does not select the metrics Service")
    if [e.get("port") for e in monitor["spec"]["endpoints"]] != ["metrics"]:
        fail("ServiceMonitor", "must scrape the port named metrics")
    if not selects(pdb["spec"]["selector"].get("matchLabels", {}), pod_labels):
        fail("PodDisruptionBudget", "does not select the worker pods")
    if not selects(policy["spec"]["podSelector"].get("matchLabels", {}), pod_labels):
        fail("NetworkPolicy", "does not select the worker pods")
    ingress_ports = {p["port"] for rule_ in policy["spec"].get("ingress", []) for p in rule_.get("ports", [])}
    if ingress_ports != {HTTP_PORT}:
        fail("NetworkPolicy", f"ingress must open exactly {HTTP_PORT}, opens {ingress_ports}")
    egress_ports = {p["port"] for rule_ in policy["spec"].get("egress", []) for p in rule_.get("ports", [])}
    for port, what in ((5672, "the broker"), (6379, "Redis"), (53, "DNS")):
        if port not in egress_ports:
            fail("NetworkPolicy", f"egress to {what} (port {port}) is missing")

    # KEDA: scales this Deployment, one trigger per request queue, all authenticated, no hasty scale-down.
    target = scaled["spec"]["scaleTargetRef"]
    if target.get("name") != deployment["metadata"]["name"]:
        fail("ScaledObject", f"scales {target.get('name')}, not the Deployment {deployment['metadata']['name']}")
    queues = [t["metadata"].get("queueName") for t in scaled["spec"]["triggers"] if t["type"] == "rabbitmq"]
    if sorted(queues) != sorted(REQUEST_QUEUES):
        fail("ScaledObject", f"needs one rabbitmq trigger per request queue {sorted(REQUEST_QUEUES)}, has {queues}")
    for t in scaled["spec"]["triggers"]:
        if t.get("authenticationRef", {}).get("name") != auth["metadata"]["name"]:
            fail("ScaledObject", f"trigger {t.get('name')} does not use TriggerAuthentication {auth['metadata']['name']}")
        if int(t["metadata"].get("value", "0")) <= 0:
            fail("ScaledObject", f"trigger {t.get('name')} needs a positive target value")
    behavior = scaled["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {})
    if behavior.get("scaleDown", {}).get("stabilizationWindowSeconds", 0) < 60:
        fail("ScaledObject", "scale-down stabilization window must be at least 60 s")

    # Overlay specifics.
    limits = container.get("resources", {}).get("limits", {})
    provider = env.get("KILN_INFERENCE__EXECUTION_PROVIDER", {}).get("value")
    if overlay == "gpu":
        if str(limits.get("nvidia.com/gpu")) != "1" or provider != "cuda":
            fail("Deployment", "the gpu overlay needs nvidia.com/gpu: 1 and KILN_INFERENCE__EXECUTION_PROVIDER=cuda")
        if not pod["spec"].get("nodeSelector") or not pod["spec"].get("tolerations"):
            fail("Deployment", "the gpu overlay needs a nodeSelector and tolerations for GPU nodes")
        if not str(container.get("image", "")).endswith("-gpu"):
            fail("Deployment", f"the gpu overlay must use the GPU image, uses {container.get('image')}")
    else:
        if "nvidia.com/gpu" in limits or provider != "cpu":
            fail("Deployment", "the cpu overlay must not ask for a GPU, and must run the cpu provider")

    # One source of truth for the alerts: the PrometheusRule's spec is the rules file.
    if rule.get("spec") != yaml.safe_load(rules_file.read_text()):
        fail("PrometheusRule", f"spec differs from {rules_file} (run scripts/render-k8s.sh --update)")

    # The Grafana dashboard ConfigMap carries valid JSON with a title.
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard")]
    if len(dashboards) != 1:
        fail("ConfigMap", "expected one Grafana dashboard ConfigMap (label grafana_dashboard)")
    for d in dashboards:
        for name, text in d.get("data", {}).items():
            if not json.loads(text).get("title"):
                fail("ConfigMap", f"dashboard {name} has no title")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--overlay", required=True, choices=["cpu", "gpu"])
    parser.add_argument("--rules", required=True, type=Path)
    parser.add_argument("--secret-example", required=True, type=Path)
    parser.add_argument("rendered", type=Path)
    args = parser.parse_args()

    docs = [d for d in yaml.safe_load_all(args.rendered.read_text()) if d]
    for doc in docs:
        validate_schema(doc, f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}")
    validate_schema(yaml.safe_load(args.secret_example.read_text()), str(args.secret_example))
    check_kiln(docs, args.overlay, args.rules, args.secret_example)

    kinds = ", ".join(sorted({d["kind"] for d in docs}))
    if errors:
        print(f"overlay {args.overlay}: {len(errors)} problem(s)", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        return 1
    print(f"overlay {args.overlay}: {len(docs)} manifests valid (Kubernetes "
          f"{' and '.join(KUBERNETES_VERSIONS)}; CRDs KEDA and prometheus-operator): {kinds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
