#!/usr/bin/env python3
"""Check kiln's message schemas and their examples.

    python3 -m venv .venv && .venv/bin/pip install -r schemas/requirements.txt
    .venv/bin/python schemas/check_schemas.py

What it checks (it reports every failure, then exits 1 if there was any):

1. `request.v1.schema.json`, `reply.v1.schema.json`, `heartbeat.v1.schema.json` and `cancel.v1.schema.json`
   are valid JSON Schema 2020-12 (`Draft202012Validator.check_schema`).
2. Every `examples/*.json` is valid against its schema, and every `examples/invalid/*.json`
   is invalid. The schema is chosen by the file name's prefix (`request-`, `reply-`, `heartbeat-`
   or `cancel`: `cancel.json` and `cancel-*.json`).
3. Each invalid example fails for the reason it was written for: `EXPECTED_INVALID` names,
   for every file, the instance location and the keyword of the violation, and that error must
   be among the ones reported. This keeps an example from passing the check by accident (say, a
   typo elsewhere in the document) once the schema changes. A new invalid example needs an entry.
4. `asyncapi.yaml` parses, declares AsyncAPI 3.0.0, and every `$ref` in it resolves: local
   pointers inside the document, and relative file references to existing JSON files and
   pointers inside them.
5. Every message example in `asyncapi.yaml` is valid against its message's `payload` and
   `headers` schemas, and a `kiln-reply` header holds a valid reply document whose `status`
   matches the `kiln-status` header, whose `rate_limit` matches the `x-ratelimit-*` and
   `retry-after` headers (present exactly when it is; seconds rounded up; `retry-after` only
   when `retry_after_ms` > 0), and which equals the payload when the example has one.
   (The AsyncAPI parser does not check examples.)

Checks 4 and 5 are not a full AsyncAPI validation; for that, run
`npx @asyncapi/cli validate schemas/asyncapi.yaml`.

`format` is asserted (`date-time` needs the `rfc3339-validator` package, pinned in
requirements.txt); the schemas also spell the RFC 3339 shape as a `pattern`, so validators that
treat `format` as an annotation only still refuse most bad timestamps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.parse import unquote

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry
from referencing.jsonschema import DRAFT202012

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE / "examples"
SCHEMAS = {
    "request-": HERE / "request.v1.schema.json",
    "reply-": HERE / "reply.v1.schema.json",
    "heartbeat-": HERE / "heartbeat.v1.schema.json",
    "cancel": HERE / "cancel.v1.schema.json",
}

# file name -> (JSON pointer of the offending value, keyword that must report it)
EXPECTED_INVALID: dict[str, tuple[str, str]] = {
    "request-missing-request-id.json": ("", "required"),
    "request-model-missing.json": ("", "required"),
    "request-image-missing.json": ("", "required"),
    "request-version-string.json": ("/version", "type"),
    "request-version-2.json": ("/version", "const"),
    "request-unknown-field.json": ("", "additionalProperties"),
    "request-params-unknown-key.json": ("/params", "additionalProperties"),
    "request-strength-string.json": ("/params/strength", "type"),
    "request-strength-above-1.json": ("/params/strength", "maximum"),
    "request-style-index-26.json": ("/params/style", "maximum"),
    "request-style-fraction.json": ("/params/style", "type"),
    "request-blend-index-26.json": ("/params/style", "pattern"),
    "request-blend-key-not-decimal.json": ("/params/style", "pattern"),
    "request-blend-negative-weight.json": ("/params/style/3", "minimum"),
    "request-blend-all-zero.json": ("/params/style", "not"),
    "request-blend-empty.json": ("/params/style", "minProperties"),
    "request-size-zero.json": ("/params/size", "minimum"),
    "request-request-id-space.json": ("/request_id", "pattern"),
    "request-request-id-empty.json": ("/request_id", "minLength"),
    "request-request-id-too-long.json": ("/request_id", "maxLength"),
    "request-user-id-control-char.json": ("/user_id", "not"),
    "request-user-id-empty.json": ("/user_id", "minLength"),
    "request-user-id-too-long.json": ("/user_id", "maxLength"),
    "request-image-as-string.json": ("/image", "type"),
    "request-image-extra-field.json": ("/image", "additionalProperties"),
    "request-image-data-not-base64.json": ("/image/data", "pattern"),
    "request-image-data-bad-length.json": ("/image/data", "pattern"),
    "request-deadline-space-separator.json": ("/deadline", "pattern"),
    "request-deadline-no-offset.json": ("/deadline", "pattern"),
    "request-deadline-unix-seconds.json": ("/deadline", "type"),
    "request-created-at-bad-month.json": ("/created_at", "format"),
    "request-tier-not-string.json": ("/tier", "type"),
    "request-multistyle-with-style-image.json": ("/params", "not"),
    "request-arbitrary-missing-style-image.json": ("/params", "required"),
    "request-arbitrary-missing-params.json": ("", "required"),
    "request-arbitrary-with-style.json": ("/params", "not"),
    "request-text-to-image-with-image.json": ("", "not"),
    "request-edit-without-image.json": ("", "required"),
    "request-diffusion-without-prompt.json": ("/params", "required"),
    "request-prompt-not-string.json": ("/params/prompt", "type"),
    "request-prompt-blank.json": ("/params/prompt", "pattern"),
    "request-task-unknown.json": ("/params/task", "enum"),
    "request-scheduler-unknown.json": ("/params/scheduler", "enum"),
    "request-seed-too-large.json": ("/params/seed", "maximum"),
    "request-seed-negative.json": ("/params/seed", "minimum"),
    "request-steps-negative.json": ("/params/steps", "minimum"),
    "request-guidance-negative.json": ("/params/guidance_scale", "minimum"),
    "request-text-to-image-with-strength.json": ("/params", "not"),
    "request-text-to-image-with-image-guidance.json": ("/params", "not"),
    "request-style-key-with-diffusion-key.json": ("/params", "not"),
    "request-style-with-prompt.json": ("/params", "not"),
    "request-progress-not-boolean.json": ("/progress", "type"),
    "reply-ok-with-error.json": ("/error", "type"),
    "reply-ok-without-image.json": ("/image", "type"),
    "reply-ok-null-request-id.json": ("/request_id", "type"),
    "reply-error-with-image.json": ("/image", "type"),
    "reply-error-without-error.json": ("/error", "type"),
    "reply-error-unknown-code.json": ("/error/code", "enum"),
    "reply-error-extra-field.json": ("/error", "additionalProperties"),
    "reply-image-extra-field.json": ("/image", "additionalProperties"),
    "reply-image-format-jpeg.json": ("/image/format", "const"),
    "reply-status-unknown.json": ("/status", "enum"),
    "reply-negative-timing.json": ("/timings_ms/inference", "minimum"),
    "reply-missing-timings.json": ("", "required"),
    "reply-missing-worker-id.json": ("", "required"),
    "reply-version-string.json": ("/version", "type"),
    "reply-deferred-without-deferred.json": ("", "required"),
    "reply-deferred-null-deferred.json": ("/deferred", "type"),
    "reply-deferred-with-image.json": ("/image", "type"),
    "reply-deferred-with-error.json": ("/error", "type"),
    "reply-deferred-null-request-id.json": ("/request_id", "type"),
    "reply-deferred-unknown-reason.json": ("/deferred/reason", "enum"),
    "reply-deferred-count-zero.json": ("/deferred/count", "minimum"),
    "reply-degraded-unknown-reason.json": ("/degraded/reason", "enum"),
    "reply-deferred-retry-after-string.json": ("/deferred/retry_after_ms", "type"),
    "reply-deferred-extra-field.json": ("/deferred", "additionalProperties"),
    "reply-ok-with-deferred.json": ("/deferred", "type"),
    "reply-rate-limit-unknown-scope.json": ("/rate_limit/scope", "enum"),
    "reply-rate-limit-extra-field.json": ("/rate_limit", "additionalProperties"),
    "reply-rate-limit-missing-retry-after.json": ("/rate_limit", "required"),
    "reply-rate-limit-negative-remaining.json": ("/rate_limit/remaining", "minimum"),
    "reply-rate-limit-null.json": ("/rate_limit", "type"),
    "reply-generation-extra-field.json": ("/generation", "additionalProperties"),
    "reply-generation-unknown-task.json": ("/generation/task", "enum"),
    "reply-generation-seed-too-large.json": ("/generation/seed", "maximum"),
    "reply-generation-edit-without-image-guidance.json": ("/generation", "required"),
    "reply-generation-image-guidance-not-edit.json": ("/generation", "not"),
    "reply-generation-truncation-extra-field.json": ("/generation/prompt_truncated", "additionalProperties"),
    "reply-error-with-generation.json": ("", "not"),
    "reply-progress-without-progress.json": ("", "required"),
    "reply-progress-step-zero.json": ("/progress/step", "minimum"),
    "reply-progress-extra-field.json": ("/progress", "additionalProperties"),
    "reply-progress-with-image.json": ("/image", "type"),
    "reply-ok-with-progress.json": ("", "not"),
    "reply-degraded-nothing-cut.json": ("/degraded", "anyOf"),
    "reply-degraded-steps-zero.json": ("/degraded/steps", "minimum"),
    "heartbeat-state-unknown.json": ("/state", "enum"),
    "heartbeat-busy-fraction-above-1.json": ("/busy_fraction", "maximum"),
    "heartbeat-missing-worker-id.json": ("", "required"),
    "heartbeat-capacity-zero.json": ("/capacity_images_per_second", "exclusiveMinimum"),
    "heartbeat-queue-extra-field.json": ("/queue", "additionalProperties"),
    "heartbeat-throttle-reason-unknown.json": ("/gpus/0/throttle_reasons/0", "enum"),
    "heartbeat-timestamp-unix.json": ("/timestamp", "type"),
    "heartbeat-broker-failovers-negative.json": ("/broker_failovers", "minimum"),
    "heartbeat-broker-node-empty.json": ("/broker_node", "minLength"),
    "cancel-missing-request-id.json": ("", "required"),
    "cancel-version-2.json": ("/version", "const"),
    "cancel-request-id-space.json": ("/request_id", "pattern"),
    "cancel-unknown-field.json": ("", "additionalProperties"),
    "cancel-reason-not-string.json": ("/reason", "type"),
    "cancel-reason-too-long.json": ("/reason", "maxLength"),
}


def pointer(path) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)


def all_errors(errors):
    """Every error, including those nested in oneOf/anyOf contexts, as (pointer, keyword)."""
    for error in errors:
        yield pointer(error.absolute_path), error.validator
        yield from all_errors(error.context or [])


def schema_for(name: str) -> Path | None:
    return next((path for prefix, path in SCHEMAS.items() if name.startswith(prefix)), None)


def load_validators(failures: list[str]) -> dict[Path, Draft202012Validator]:
    validators = {}
    for path in SCHEMAS.values():
        schema = json.loads(path.read_text(encoding="utf-8"))
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as error:
            failures.append(f"{path.name}: not a valid 2020-12 schema: {error.message}")
            continue
        validators[path] = Draft202012Validator(
            schema, format_checker=Draft202012Validator.FORMAT_CHECKER
        )
    return validators


def check_examples(validators, failures: list[str]) -> int:
    checked = 0
    cases = [(path, True) for path in sorted(EXAMPLES.glob("*.json"))]
    cases += [(path, False) for path in sorted((EXAMPLES / "invalid").glob("*.json"))]
    for path, should_pass in cases:
        label = path.relative_to(HERE)
        schema = schema_for(path.name)
        if schema is None:
            failures.append(f"{label}: name must start with one of {list(SCHEMAS)}")
            continue
        if schema not in validators:
            continue  # the schema itself failed; already reported
        instance = json.loads(path.read_text(encoding="utf-8"))
        errors = list(validators[schema].iter_errors(instance))
        checked += 1
        if should_pass:
            for error in errors:
                failures.append(f"{label}: expected valid, but {pointer(error.absolute_path) or '/'}: {error.message}")
            continue
        if not errors:
            failures.append(f"{label}: expected invalid, but it validates")
            continue
        expected = EXPECTED_INVALID.get(path.name)
        if expected is None:
            failures.append(f"{label}: no entry in EXPECTED_INVALID saying why it is invalid")
        elif expected not in set(all_errors(errors)):
            found = sorted(set(all_errors(errors)))
            failures.append(f"{label}: expected a {expected[1]!r} error at {expected[0] or '/'!r}, got {found}")
    stale = set(EXPECTED_INVALID) - {path.name for path, _ in cases}
    failures.extend(f"EXPECTED_INVALID names a missing file: {name}" for name in sorted(stale))
    return checked


def resolve_pointer(document, fragment: str, where: str):
    node = document
    for raw in fragment.lstrip("/").split("/") if fragment.strip("/") else []:
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(f"{where}: no {part!r} in pointer #{fragment}")
    return node


def refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def check_asyncapi(failures: list[str], schemas_ok: bool) -> None:
    path = HERE / "asyncapi.yaml"
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        failures.append(f"asyncapi.yaml: {error}")
        return
    if document.get("asyncapi") != "3.0.0":
        failures.append(f"asyncapi.yaml: asyncapi is {document.get('asyncapi')!r}, expected '3.0.0'")
    failures_before = len(failures)
    for ref in refs(document):
        file_part, _, fragment = ref.partition("#")
        try:
            target = document
            if file_part:
                target_path = (path.parent / file_part).resolve()
                target = json.loads(target_path.read_text(encoding="utf-8"))
            resolve_pointer(target, fragment, ref)
        except (OSError, ValueError, KeyError, IndexError) as error:
            failures.append(f"asyncapi.yaml: $ref {ref!r} does not resolve: {error}")
    # The examples can only be checked against valid schemas whose every $ref resolves.
    if schemas_ok and len(failures) == failures_before:
        check_asyncapi_examples(path, document, failures)


def check_asyncapi_examples(path: Path, document: dict, failures: list[str]) -> None:
    # The YAML document and the JSON schemas, each under its file URI, so that the schemas'
    # relative references ('./reply.v1.schema.json', '#/components/...') resolve as written.
    yaml_uri = path.as_uri()
    resources = [(yaml_uri, DRAFT202012.create_resource(document))]
    for schema_path in SCHEMAS.values():
        contents = json.loads(schema_path.read_text(encoding="utf-8"))
        resources.append((schema_path.as_uri(), DRAFT202012.create_resource(contents)))
    registry = Registry().with_resources(resources)
    reply_validator = Draft202012Validator(
        {"$ref": SCHEMAS["reply-"].as_uri()}, registry=registry,
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )

    def validator(pointer_in_yaml: str) -> Draft202012Validator:
        return Draft202012Validator(
            {"$ref": f"{yaml_uri}#{pointer_in_yaml}"}, registry=registry,
            format_checker=Draft202012Validator.FORMAT_CHECKER,
        )

    for name, message in document.get("components", {}).get("messages", {}).items():
        for index, example in enumerate(message.get("examples", [])):
            label = f"asyncapi.yaml: components/messages/{name}/examples/{index}"
            for part in ("payload", "headers"):
                if part not in example:
                    continue
                if part not in message:
                    failures.append(f"{label}: has {part} but the message defines no {part} schema")
                    continue
                for error in validator(f"/components/messages/{name}/{part}").iter_errors(example[part]):
                    failures.append(f"{label}/{part}{pointer(error.absolute_path)}: {error.message}")
            headers = example.get("headers", {})
            if "kiln-reply" in headers:
                try:
                    reply = json.loads(headers["kiln-reply"])
                except (TypeError, ValueError) as error:
                    failures.append(f"{label}/headers/kiln-reply: not JSON: {error}")
                    continue
                for error in reply_validator.iter_errors(reply):
                    failures.append(f"{label}/headers/kiln-reply{pointer(error.absolute_path)}: {error.message}")
                if isinstance(reply, dict) and reply.get("status") != headers.get("kiln-status"):
                    failures.append(f"{label}/headers: kiln-status does not match the kiln-reply status")
                if "payload" in example and example["payload"] != reply:
                    failures.append(f"{label}: the body differs from the kiln-reply header")
                if isinstance(reply, dict):
                    for problem in rate_limit_header_problems(reply.get("rate_limit"), headers):
                        failures.append(f"{label}/headers: {problem}")


def ceil_seconds(ms) -> int | None:
    return -(-ms // 1000) if isinstance(ms, int) else None


def rate_limit_header_problems(rate_limit, headers: dict) -> list[str]:
    """What the worker's publisher does: the headers mirror `rate_limit`, in seconds rounded up."""
    expected = {}
    if isinstance(rate_limit, dict):
        expected = {
            "x-ratelimit-limit": rate_limit.get("limit"),
            "x-ratelimit-remaining": rate_limit.get("remaining"),
            "x-ratelimit-reset": ceil_seconds(rate_limit.get("reset_ms")),
        }
        if rate_limit.get("retry_after_ms"):
            expected["retry-after"] = ceil_seconds(rate_limit.get("retry_after_ms"))
    problems = []
    for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after"):
        if headers.get(name) != expected.get(name):
            want = "absent" if name not in expected else expected[name]
            problems.append(f"{name} is {headers.get(name, 'absent')!r}, the kiln-reply rate_limit says {want!r}")
    return problems


def main() -> int:
    failures: list[str] = []
    validators = load_validators(failures)
    checked = check_examples(validators, failures)
    check_asyncapi(failures, schemas_ok=len(validators) == len(SCHEMAS))
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} failure(s)", file=sys.stderr)
        return 1
    print(f"ok: {len(SCHEMAS)} schemas, {checked} examples, asyncapi.yaml references and examples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
