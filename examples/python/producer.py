#!/usr/bin/env python3
r"""Send a request to a kiln worker over RabbitMQ and save the PNG it sends back.

    python3 -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
    .venv/bin/python examples/python/producer.py --style 7 photo.jpg -o styled.png
    .venv/bin/python examples/python/producer.py --style 3:0.5,12:0.5 --size 512 photo.jpg -o blend.png
    .venv/bin/python examples/python/producer.py --model arbitrary-style --style-image art.jpg photo.jpg -o out.png

Diffusion models take a prompt; text_to_image takes no photo:

    .venv/bin/python examples/python/producer.py --model sd-tiny-random --prompt "a lighthouse at dusk" \
        --steps 25 --guidance-scale 7.5 --seed 42 --width 96 --height 64 --scheduler euler -o lighthouse.png
    .venv/bin/python examples/python/producer.py --model sd-tiny-random --task image_to_image \
        --prompt "an oil painting" --strength 0.6 photo.jpg -o painted.png
    .venv/bin/python examples/python/producer.py --model pix2pix-tiny-random --task edit \
        --prompt "make it snow" --image-guidance-scale 1.5 photo.jpg -o snowy.png

An edit chain sends the photo with the first instruction to an edit model (task edit), then the
PNG it gets back with the next instruction, and so on; step N's PNG is saved as OUT with `-N`
before the suffix (`-o snowy.png` writes snowy-1.png, snowy-2.png, ...). Give the instructions
with one `--edit-chain` (after the photo: it takes every argument up to the next option) or with
repeated `--then`. The model defaults to pix2pix-tiny-random, the task to edit, and the other
diffusion options (--seed, --steps, ...) apply to every step:

    .venv/bin/python examples/python/producer.py photo.jpg --edit-chain "make it snow" "add a red scarf" -o out.png
    .venv/bin/python examples/python/producer.py --then "make it snow" --then "add a red scarf" photo.jpg -o out.png

The contract in brief (docs/contract.md is normative; schemas/ has the JSON Schemas):

* A request is one AMQP message on the durable quorum queue `kiln.requests`, published to the
  default exchange with routing key `kiln.requests`, persistent (delivery_mode 2). Its body is a
  UTF-8 JSON document (content_type application/json): version 1, request_id, user_id, model,
  optional params (style models: style, style_image, strength, size; diffusion models: task,
  prompt, negative_prompt, steps, guidance_scale, image_guidance_scale, strength, seed, width,
  height, scheduler), the image as base64 (absent for text_to_image), optional deadline and
  created_at (RFC 3339), and optional progress (true asks for progress notices). Unknown fields
  are refused.
* Every request gets exactly one final reply. With the `reply_to` property set (as here) it goes to
  that queue; without it, to the `kiln.results` topic exchange with routing key = request_id. The
  reply's correlation_id is the request's (or the request_id when the request had none).
* The reply document travels as JSON in the `kiln-reply` header, with `kiln-status` = ok | error |
  deferred | progress. On ok the body is the PNG file itself (content_type image/png); on error the body is the
  reply document again, and `error.code` says what went wrong (`error.message` is for humans;
  `rate_limited` means the user is over a limit, and `rate_limit` says which).
* `deferred` is NOT final: the user is over a rate limit whose tier policy is to defer, so the
  request waits in a delay queue and its final reply (ok or error) follows later with the same
  correlation_id; `deferred` = {retry_after_ms, reason, count}. A request may be deferred several
  times. `progress` is NOT final either: sent only when the request asked for it (--progress
  here), while a diffusion model runs it step by step, `progress` = {step, steps}. Any status
  other than ok and error is treated as not final.

This script declares its own exclusive, auto-delete, server-named reply queue, publishes with
publisher confirms and mandatory=True (so a missing `kiln.requests` queue is reported instead of
the message being silently dropped), and waits for the final reply whose correlation_id matches:
each `deferred` notice on the way prints one line to stderr,

    deferred: rate, retrying in 32 s

and the wait goes on; --timeout bounds the whole wait, deferrals included. With --progress the
request asks for progress notices, and each prints a line there too:

    step 12/25


Output, for scripts and tests: exactly one line of JSON on stdout, nothing else there
(diagnostics go to stderr):

    {"status": "ok", "out": "styled.png", "width": 512, "height": 384, "timings_ms": {...}}
    {"status": "error", "code": "unknown_style", "message": "..."}

A diffusion model's ok line also has the reply's `generation` (task, scheduler, seed, steps,
steps_run, guidance_scale, ...; the seed used is there even when --seed was not given):

    {"status": "ok", "out": "lighthouse.png", "width": 96, "height": 64, "timings_ms": {...},
     "generation": {"task": "text_to_image", "scheduler": "euler", "seed": 42, ...}}

An edit chain prints one line too, after its last step, with every step in order; `out`, `width`
and `height` are the last step's:

    {"status": "ok", "out": "out-2.png", "width": 64, "height": 64, "steps": [
      {"step": 1, "instruction": "make it snow", "out": "out-1.png", "width": 64, "height": 64,
       "timings_ms": {...}, "generation": {...}},
      {"step": 2, "instruction": "add a red scarf", "out": "out-2.png", ...}]}

and stops at the first error reply, with the steps done before it:

    {"status": "error", "code": "invalid_prompt", "message": "...", "step": 2,
     "instruction": "", "steps": [{"step": 1, ...}]}

--timeout bounds each step's wait. A step that gets no reply or is not enqueued ends the chain with
that exit status (3 or 4) and nothing on stdout; the PNGs of the steps before it stay.

Cancel a request by its request_id (any producer's): one message on the fanout exchange
`kiln.cancel`, which every worker binds; a worker holding the request stops it and answers it with
the error `cancelled`, and one still queued is answered `cancelled` when it arrives
(docs/contract.md, "Cancelling a request"). It prints `{"status": "cancel_sent", "request_id": ...}`,
or exits 4 when no worker is listening:

    .venv/bin/python examples/python/producer.py --cancel 3f1c2a9e-6d7b-4d8e-9a51-2f0c7b1e5d44 --reason "user left"

Signed requests (docs/contract.md, "Signed requests"): with --key-id and the key's secret in
--key-secret-file or the environment variable KILN_KEY_SECRET, each request carries a
`kiln-signature` header, HMAC-SHA256 over the body, the queue, reply_to and correlation_id
(`signature_header` below is the whole algorithm). Workers whose auth.policy is `required` answer
an unsigned or wrongly signed request with the error `unauthenticated`:

    KILN_KEY_SECRET=$(cat acme.secret) .venv/bin/python examples/python/producer.py --key-id acme \
        --user acme:42 --style 7 photo.jpg -o styled.png

Exit status: 0 ok; 2 the worker answered with an error (argparse also exits 2 on a usage error,
printing nothing on stdout); 3 no final reply within --timeout; 4 the broker did not take the request
(no such queue, or it nacked it); 1 anything else (cannot connect, cannot read the image, a reply
that breaks the contract).

Values are passed through as given, without range checks, so the worker's own validation (and
its error codes) can be exercised: `--style 26` is answered with `unknown_style`, `--task inpaint`
with `unsupported_task`, `--prompt ""` with `invalid_prompt`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import struct
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pika
from pika.exceptions import AMQPError, NackError, UnroutableError

CONTRACT_VERSION = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_ERROR_REPLY = 2
EXIT_TIMEOUT = 3
EXIT_NOT_ENQUEUED = 4


class Failure(Exception):
    """Ends the program: a message for stderr and an exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILURE):
        super().__init__(message)
        self.status = status


def style_argument(text: str) -> int | dict[str, float]:
    """`7` selects one style; `3:0.5,12:0.5` a blend of styles 3 and 12 with those weights."""
    if ":" not in text:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a style index or INDEX:WEIGHT list: {text!r}") from None
    blend: dict[str, float] = {}
    for item in text.split(","):
        index, sep, weight = item.partition(":")
        try:
            blend[str(int(index))] = float(weight)
        except ValueError:
            raise argparse.ArgumentTypeError(f"blend items are INDEX:WEIGHT, got {item!r}") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"blend items are INDEX:WEIGHT, got {item!r}")
    return blend


DEFAULT_MODEL = "multistyle26"
DEFAULT_EDIT_MODEL = "pix2pix-tiny-random"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send a request to a kiln worker and save the PNG it replies with.",
        epilog="Prints one line of JSON on stdout. Exit status: 0 ok, 2 error reply, "
        "3 timeout, 4 request not enqueued, 1 other failure.",
    )
    parser.add_argument("image", type=Path, nargs="?",
                        help="the input picture (JPEG, PNG or WebP): the photo to stylize, redraw or edit; "
                        "required unless --prompt is given (text_to_image takes none)")
    parser.add_argument("-o", "--out", type=Path,
                        help="where to write the PNG (default: IMAGE's name with .kiln.png, in the current "
                        "directory; without IMAGE, kiln-SEED.png); an edit chain writes OUT with -1, -2, ... "
                        "before the suffix")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F",
                        help="AMQP URL (default: %(default)s)")
    parser.add_argument("--queue", default="kiln.requests", help="request queue (default: %(default)s)")
    parser.add_argument("--model", help=f"model name (default: {DEFAULT_MODEL}; {DEFAULT_EDIT_MODEL} "
                        "for an edit chain)")
    parser.add_argument("--strength", type=float,
                        help="style models: 0 to 1 (worker default 1.0); diffusion, image_to_image: how far the "
                        "image is noised (default 0.8)")
    style = parser.add_argument_group("style models")
    style.add_argument("--style", type=style_argument,
                       help="multistyle26: a style index (7) or a blend (3:0.5,12:0.5)")
    style.add_argument("--style-image", type=Path, help="arbitrary-style: the picture to take the style from")
    style.add_argument("--size", type=int, help="the output's longer side in pixels")
    diffusion = parser.add_argument_group("diffusion models")
    diffusion.add_argument("--prompt", help="what to draw; for task edit, the instruction")
    diffusion.add_argument("--negative-prompt", help="what to steer away from (with guidance)")
    diffusion.add_argument("--task", help="text_to_image, image_to_image or edit (default: the model's first task that takes what is sent: a photo or none)")
    diffusion.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    diffusion.add_argument("--guidance-scale", type=float, help="classifier-free guidance; <= 1 turns it off")
    diffusion.add_argument("--image-guidance-scale", type=float, help="edit: how closely to keep to the image")
    diffusion.add_argument("--seed", type=int, help="0 to 4294967295 (default: random; the reply says it)")
    diffusion.add_argument("--width", type=int, help="output width in pixels, a multiple of the model's")
    diffusion.add_argument("--height", type=int, help="output height in pixels, a multiple of the model's")
    diffusion.add_argument("--scheduler", help="euler, euler_ancestral, ddim or lcm (default: the model's)")
    diffusion.add_argument("--edit-chain", nargs="+", action="extend", dest="edit_chain", metavar="INSTRUCTION",
                           help="edit IMAGE with each instruction in turn, each step starting from the "
                           "previous step's PNG (put IMAGE before this option)")
    diffusion.add_argument("--then", action="append", dest="edit_chain", metavar="INSTRUCTION",
                           help="one more edit-chain step (repeatable; same as --edit-chain)")
    parser.add_argument("--progress", action="store_true",
                        help="diffusion models: ask for progress notices and print each as 'step I/N' on stderr")
    parser.add_argument("--deadline-seconds", type=float, metavar="N",
                        help="set the request's deadline to now + N seconds")
    parser.add_argument("--user", default="example-user", help="user_id (default: %(default)s)")
    parser.add_argument("--request-id", help="request_id (default: a new UUID; an edit chain adds -1, -2, ...)")
    parser.add_argument("--cancel", metavar="REQUEST_ID",
                        help="send no request: cancel the request with this request_id, then exit")
    parser.add_argument("--reason", help="with --cancel: why, for the workers' logs")
    parser.add_argument("--cancel-exchange", default="kiln.cancel",
                        help="the cancel exchange (default: %(default)s)")
    parser.add_argument("--key-id", help="sign each request with this key id (its secret from --key-secret-file "
                        "or KILN_KEY_SECRET)")
    parser.add_argument("--key-secret-file", type=Path, help="file holding the key's secret (one trailing newline "
                        "is ignored)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the final reply, deferrals included; per step of an edit "
                        "chain (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.cancel is not None:
        return args
    if args.edit_chain:
        if args.image is None:
            parser.error("an edit chain needs IMAGE to start from")
        if args.prompt is not None:
            parser.error("--prompt and --edit-chain/--then are exclusive: the instructions are the prompts")
    elif args.image is None and args.prompt is None:
        parser.error("IMAGE is required unless --prompt is given")
    if args.model is None:
        args.model = DEFAULT_EDIT_MODEL if args.edit_chain else DEFAULT_MODEL
    return args


def rfc3339(instant: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix: 2026-11-27T23:58:30.125Z."""
    return instant.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encoded_file(path: Path) -> dict[str, str]:
    try:
        return {"data": base64.b64encode(path.read_bytes()).decode("ascii")}
    except OSError as error:
        raise Failure(f"cannot read {path}: {error.strerror or error}") from error


# params key -> the option's attribute, in the order the request document lists them
PASS_THROUGH = (
    ("style", "style"), ("style_image", "style_image"), ("strength", "strength"), ("size", "size"),
    ("task", "task"), ("prompt", "prompt"), ("negative_prompt", "negative_prompt"), ("steps", "steps"),
    ("guidance_scale", "guidance_scale"), ("image_guidance_scale", "image_guidance_scale"), ("seed", "seed"),
    ("width", "width"), ("height", "height"), ("scheduler", "scheduler"),
)


def build_request(args: argparse.Namespace, now: datetime, image: dict[str, str] | None,
                  overrides: dict | None = None, request_id: str | None = None) -> dict:
    """The request document (schemas/request.v1.schema.json).

    `image` is the encoded input picture, or None to send none; `overrides` replaces params from
    the options (an edit chain's task and prompt).
    """
    params: dict = {}
    for key, attribute in PASS_THROUGH:
        value = getattr(args, attribute)
        if value is not None:
            params[key] = encoded_file(value) if key == "style_image" else value
    params.update(overrides or {})

    request = {
        "version": CONTRACT_VERSION,
        "request_id": request_id if request_id is not None else str(uuid.uuid4()),
        "user_id": args.user,
        "model": args.model,
    }
    if params:
        request["params"] = params
    if image is not None:
        request["image"] = image
    if args.deadline_seconds is not None:
        request["deadline"] = rfc3339(now + timedelta(seconds=args.deadline_seconds))
    request["created_at"] = rfc3339(now)
    if args.progress:
        request["progress"] = True
    return request


def signature_header(key_id: str, secret: bytes, queue: str, reply_to: str, correlation_id: str, body: bytes,
                     timestamp_ms: int | None = None) -> str:
    """The `kiln-signature` header of a request (docs/contract.md, "Signed requests").

    HMAC-SHA256, keyed with the secret's bytes, of seven lines joined by line feeds: the scheme
    `kiln-sig-v1`, the key id, the time in Unix milliseconds, the queue the request is published
    to, its reply_to and correlation_id (empty strings when absent), and the SHA-256 of the body
    in lowercase hex. Sign the exact bytes you publish; none of the fields may hold a line feed.
    """
    if timestamp_ms is None:
        timestamp_ms = time.time_ns() // 1_000_000
    fields = ["kiln-sig-v1", key_id, str(timestamp_ms), queue, reply_to, correlation_id,
              hashlib.sha256(body).hexdigest()]
    if any("\n" in field for field in fields):
        raise Failure("a signed request's key id, queue, reply_to and correlation_id may not hold a line feed")
    mac = hmac.new(secret, "\n".join(fields).encode("utf-8"), hashlib.sha256).hexdigest()
    return f"v1;kid={key_id};ts={timestamp_ms};sig={mac}"


def key_secret(args: argparse.Namespace) -> bytes | None:
    """The signing key's secret, from --key-secret-file or KILN_KEY_SECRET; None without --key-id."""
    if args.key_id is None:
        return None
    if args.key_secret_file is not None:
        try:
            text = args.key_secret_file.read_text(encoding="utf-8")
        except OSError as error:
            raise Failure(f"cannot read {args.key_secret_file}: {error.strerror or error}") from error
        return text.removesuffix("\n").removesuffix("\r").encode("utf-8")
    secret = os.environ.get("KILN_KEY_SECRET")
    if not secret:
        raise Failure("--key-id needs the key's secret: --key-secret-file or KILN_KEY_SECRET")
    return secret.encode("utf-8")


def signing(args: argparse.Namespace) -> tuple[str, bytes] | None:
    """(key id, secret) to sign requests with, or None to send them unsigned."""
    secret = key_secret(args)
    return None if secret is None else (args.key_id, secret)


def publish(channel, queue: str, body: bytes, reply_to: str, correlation_id: str,
            signing: tuple[str, bytes] | None = None) -> None:
    """Publish persistently with mandatory=True and wait for the broker's confirm; signed with
    `signing` = (key id, secret) when given."""
    headers = None
    if signing is not None:
        key_id, secret = signing
        headers = {"kiln-signature": signature_header(key_id, secret, queue, reply_to, correlation_id, body)}
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        reply_to=reply_to,
        correlation_id=correlation_id,
        timestamp=int(time.time()),
        headers=headers,
    )
    try:
        channel.basic_publish(exchange="", routing_key=queue, body=body, properties=properties, mandatory=True)
    except UnroutableError:
        raise Failure(f"queue {queue!r} does not exist: the broker returned the request as unroutable",
                      EXIT_NOT_ENQUEUED) from None
    except NackError:
        raise Failure(f"the broker refused the request (nack) on queue {queue!r}", EXIT_NOT_ENQUEUED) from None


def cancel(channel, exchange: str, request_id: str, reason: str | None = None) -> None:
    """Ask every worker to stop `request_id`: a cancel document on the fanout `exchange`, transient,
    mandatory, confirmed (the channel must be in confirm mode). Raises Failure when no worker's queue
    is bound, i.e. nobody heard it."""
    document = {"version": CONTRACT_VERSION, "request_id": request_id}
    if reason is not None:
        document["reason"] = reason
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Transient,
        type="kiln.cancel.v1",
        timestamp=int(time.time()),
    )
    # Declaring it (as workers do) keeps a publish to a missing exchange from closing the channel.
    channel.exchange_declare(exchange=exchange, exchange_type="fanout", durable=True)
    body = json.dumps(document, separators=(",", ":")).encode("utf-8")
    try:
        channel.basic_publish(exchange=exchange, routing_key="", body=body, properties=properties, mandatory=True)
    except UnroutableError:
        raise Failure(f"no worker listens on {exchange!r}: nothing was cancelled", EXIT_NOT_ENQUEUED) from None
    except NackError:
        raise Failure(f"the broker refused the cancel (nack) on {exchange!r}", EXIT_NOT_ENQUEUED) from None


FINAL_STATUSES = ("ok", "error")


def wait_for_reply(channel, reply_queue: str, correlation_id: str, timeout: float):
    """The final reply on `reply_queue` whose correlation_id matches, as (properties, body, document).

    Notices that are not final (`deferred`, `progress`, or a status this script does not know) are
    reported on stderr and the wait goes on; `timeout` bounds the whole wait.
    """
    deadline = time.monotonic() + timeout
    for method, properties, body in channel.consume(reply_queue, auto_ack=True, inactivity_timeout=0.25):
        if method is not None:
            if properties.correlation_id == correlation_id:
                document = reply_document(properties)
                if document["status"] in FINAL_STATUSES:
                    return properties, body, document
                print(not_final_line(document), file=sys.stderr, flush=True)
            else:
                print(f"ignoring a message with correlation_id {properties.correlation_id!r}", file=sys.stderr)
        if time.monotonic() >= deadline:
            raise Failure(f"no final reply within {timeout:g} s", EXIT_TIMEOUT)
    raise Failure("the reply consumer was cancelled by the broker")


def not_final_line(document: dict) -> str:
    """One line for stderr about a notice that is not the final reply."""
    if document["status"] == "progress":
        progress = document.get("progress")
        progress = progress if isinstance(progress, dict) else {}
        return f"step {progress.get('step', '?')}/{progress.get('steps', '?')}"
    if document["status"] != "deferred":
        return f"not final: status {document['status']!r}, still waiting"
    deferral = document.get("deferred")
    deferral = deferral if isinstance(deferral, dict) else {}
    reason = deferral.get("reason", "unknown reason")
    wait_ms = deferral.get("retry_after_ms")
    wait = f"{wait_ms / 1000:g}" if isinstance(wait_ms, (int, float)) and not isinstance(wait_ms, bool) else "?"
    return f"deferred: {reason}, retrying in {wait} s"


def reply_document(properties) -> dict:
    """The reply document from the `kiln-reply` header (any status; the caller decides what is final)."""
    raw = (properties.headers or {}).get("kiln-reply")
    if raw is None:
        raise Failure("the reply has no kiln-reply header")
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        document = json.loads(raw)
    except ValueError as error:
        raise Failure(f"the kiln-reply header is not JSON: {error}") from error
    if not isinstance(document, dict) or not isinstance(document.get("status"), str):
        raise Failure(f"the kiln-reply header is not a reply document: {raw[:200]!r}")
    return document


def png_dimensions(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, which must come first."""
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24 or data[12:16] != b"IHDR":
        raise Failure("the reply body is not a PNG file")
    return struct.unpack(">II", data[16:24])


def save_image(document: dict, body: bytes, out: Path) -> dict:
    """Check the PNG against the reply document, write it, and return the stdout summary."""
    image = document.get("image") or {}
    width, height = png_dimensions(body)
    if image.get("bytes") != len(body):
        raise Failure(f"the reply says {image.get('bytes')} bytes but the body has {len(body)}")
    if (image.get("width"), image.get("height")) != (width, height):
        raise Failure(f"the reply says {image.get('width')}x{image.get('height')} but the PNG is {width}x{height}")
    try:
        out.write_bytes(body)
    except OSError as error:
        raise Failure(f"cannot write {out}: {error.strerror or error}") from error
    summary = {"status": "ok", "out": str(out), "width": width, "height": height,
               "timings_ms": document.get("timings_ms")}
    if document.get("generation") is not None:
        summary["generation"] = document["generation"]
    return summary


def error_summary(document: dict) -> dict:
    error = document.get("error") or {}
    return {"status": "error", "code": error.get("code"), "message": error.get("message")}


class Session:
    """One connection, one channel with publisher confirms, and one exclusive reply queue;
    `signing` = (key id, secret) signs every request."""

    def __init__(self, url: str, signing: tuple[str, bytes] | None = None):
        self.signing = signing
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            self.channel = self.connection.channel()
            self.channel.confirm_delivery()
            declared = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
            self.reply_queue = declared.method.queue
        except BaseException:
            self.close()
            raise

    def ask(self, queue: str, request: dict, timeout: float):
        """Publish `request` and wait for its final reply: (body, document)."""
        body = json.dumps(request, separators=(",", ":")).encode("utf-8")
        correlation_id = str(uuid.uuid4())
        publish(self.channel, queue, body, self.reply_queue, correlation_id, self.signing)
        _, reply_body, document = wait_for_reply(self.channel, self.reply_queue, correlation_id, timeout)
        return reply_body, document

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def default_out(args: argparse.Namespace, document: dict | None = None) -> Path:
    if args.out is not None:
        return args.out
    if args.image is not None:
        return Path(args.image.stem + ".kiln.png")
    seed = ((document or {}).get("generation") or {}).get("seed")
    return Path(f"kiln-{seed}.png" if seed is not None else "kiln.png")


def step_path(out: Path, step: int) -> Path:
    """OUT with `-STEP` before its suffix: out.png -> out-1.png."""
    return out.with_name(f"{out.stem}-{step}{out.suffix or '.png'}")


def run(args: argparse.Namespace) -> int:
    if args.cancel is not None:
        session = Session(args.url)
        try:
            cancel(session.channel, args.cancel_exchange, args.cancel, args.reason)
        finally:
            session.close()
        print(json.dumps({"status": "cancel_sent", "request_id": args.cancel}), flush=True)
        return EXIT_OK
    if args.edit_chain:
        return run_edit_chain(args)
    image = encoded_file(args.image) if args.image is not None else None
    request = build_request(args, datetime.now(timezone.utc), image, request_id=args.request_id)

    session = Session(args.url, signing(args))
    try:
        reply_body, document = session.ask(args.queue, request, args.timeout)
    finally:
        session.close()

    if document["status"] == "ok":
        summary, status = save_image(document, reply_body, default_out(args, document)), EXIT_OK
    else:
        summary, status = error_summary(document), EXIT_ERROR_REPLY
    print(json.dumps(summary), flush=True)
    return status


def run_edit_chain(args: argparse.Namespace) -> int:
    """Edit the photo with each instruction in turn, each step starting from the last step's PNG."""
    out = default_out(args)
    image = encoded_file(args.image)
    steps: list[dict] = []
    session = Session(args.url, signing(args))
    try:
        for number, instruction in enumerate(args.edit_chain, start=1):
            overrides = {"task": args.task if args.task is not None else "edit", "prompt": instruction}
            request_id = f"{args.request_id}-{number}" if args.request_id is not None else None
            request = build_request(args, datetime.now(timezone.utc), image, overrides, request_id)
            try:
                reply_body, document = session.ask(args.queue, request, args.timeout)
            except Failure as failure:
                raise Failure(f"step {number} ({instruction!r}): {failure}", failure.status) from None
            if document["status"] != "ok":
                summary = {**error_summary(document), "step": number, "instruction": instruction, "steps": steps}
                print(json.dumps(summary), flush=True)
                return EXIT_ERROR_REPLY
            saved = save_image(document, reply_body, step_path(out, number))
            del saved["status"]
            steps.append({"step": number, "instruction": instruction, **saved})
            print(f"step {number}: {saved['out']} ({saved['width']}x{saved['height']})", file=sys.stderr, flush=True)
            image = {"data": base64.b64encode(reply_body).decode("ascii")}
    finally:
        session.close()

    last = steps[-1]
    summary = {"status": "ok", "out": last["out"], "width": last["width"], "height": last["height"], "steps": steps}
    print(json.dumps(summary), flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Failure as failure:
        print(f"producer: {failure}", file=sys.stderr)
        return failure.status
    except AMQPError as error:
        print(f"producer: AMQP error: {error!r}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
