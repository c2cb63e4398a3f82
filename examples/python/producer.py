#!/usr/bin/env python3
"""Send one image to a kiln worker over RabbitMQ and save the stylized PNG it sends back.

    python3 -m venv .venv && .venv/bin/pip install -r examples/python/requirements.txt
    .venv/bin/python examples/python/producer.py --style 7 photo.jpg -o styled.png
    .venv/bin/python examples/python/producer.py --style 3:0.5,12:0.5 --size 512 photo.jpg -o blend.png
    .venv/bin/python examples/python/producer.py --model arbitrary-style --style-image art.jpg photo.jpg -o out.png

The contract in brief (docs/contract.md is normative; schemas/ has the JSON Schemas):

* A request is one AMQP message on the durable quorum queue `kiln.requests`, published to the
  default exchange with routing key `kiln.requests`, persistent (delivery_mode 2). Its body is a
  UTF-8 JSON document (content_type application/json): version 1, request_id, user_id, model,
  optional params (style, style_image, strength, size), the image as base64, and optional
  deadline and created_at (RFC 3339). Unknown fields are refused.
* Every request gets exactly one final reply. With the `reply_to` property set (as here) it goes to
  that queue; without it, to the `kiln.results` topic exchange with routing key = request_id. The
  reply's correlation_id is the request's (or the request_id when the request had none).
* The reply document travels as JSON in the `kiln-reply` header, with `kiln-status` = ok | error |
  deferred. On ok the body is the PNG file itself (content_type image/png); on error the body is the
  reply document again, and `error.code` says what went wrong (`error.message` is for humans;
  `rate_limited` means the user is over a limit, and `rate_limit` says which).
* `deferred` is NOT final: the user is over a rate limit whose tier policy is to defer, so the
  request waits in a delay queue and its final reply (ok or error) follows later with the same
  correlation_id; `deferred` = {retry_after_ms, reason, count}. A request may be deferred several
  times. Any status other than ok and error is treated as not final.

This script declares its own exclusive, auto-delete, server-named reply queue, publishes with
publisher confirms and mandatory=True (so a missing `kiln.requests` queue is reported instead of
the message being silently dropped), and waits for the final reply whose correlation_id matches:
each `deferred` notice on the way prints one line to stderr,

    deferred: rate, retrying in 32 s

and the wait goes on; --timeout bounds the whole wait, deferrals included.

Output, for scripts and tests: exactly one line of JSON on stdout, nothing else there
(diagnostics go to stderr):

    {"status": "ok", "out": "styled.png", "width": 512, "height": 384, "timings_ms": {...}}
    {"status": "error", "code": "unknown_style", "message": "..."}

Exit status: 0 ok; 2 the worker answered with an error (argparse also exits 2 on a usage error,
printing nothing on stdout); 3 no final reply within --timeout; 4 the broker did not take the request
(no such queue, or it nacked it); 1 anything else (cannot connect, cannot read the image, a reply
that breaks the contract).

Values are passed through as given, without range checks, so the worker's own validation (and
its error codes) can be exercised: `--style 26` is answered with `unknown_style`.
"""

from __future__ import annotations

import argparse
import base64
import json
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Send one image to a kiln worker and save the PNG it replies with.",
        epilog="Prints one line of JSON on stdout. Exit status: 0 ok, 2 error reply, "
        "3 timeout, 4 request not enqueued, 1 other failure.",
    )
    parser.add_argument("image", type=Path, help="the photo to stylize (JPEG, PNG or WebP)")
    parser.add_argument("-o", "--out", type=Path,
                        help="where to write the PNG (default: IMAGE's name with .kiln.png, in the current directory)")
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2F",
                        help="AMQP URL (default: %(default)s)")
    parser.add_argument("--queue", default="kiln.requests", help="request queue (default: %(default)s)")
    parser.add_argument("--model", default="multistyle26", help="model name (default: %(default)s)")
    parser.add_argument("--style", type=style_argument,
                        help="multistyle26: a style index (7) or a blend (3:0.5,12:0.5)")
    parser.add_argument("--style-image", type=Path, help="arbitrary-style: the picture to take the style from")
    parser.add_argument("--strength", type=float, help="0 to 1 (worker default 1.0)")
    parser.add_argument("--size", type=int, help="the output's longer side in pixels")
    parser.add_argument("--deadline-seconds", type=float, metavar="N",
                        help="set the request's deadline to now + N seconds")
    parser.add_argument("--user", default="example-user", help="user_id (default: %(default)s)")
    parser.add_argument("--request-id", help="request_id (default: a new UUID)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="seconds to wait for the final reply, deferrals included (default: %(default)s)")
    return parser.parse_args(argv)


def rfc3339(instant: datetime) -> str:
    """UTC, millisecond precision, `Z` suffix: 2026-11-27T23:58:30.125Z."""
    return instant.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encoded_file(path: Path) -> dict[str, str]:
    try:
        return {"data": base64.b64encode(path.read_bytes()).decode("ascii")}
    except OSError as error:
        raise Failure(f"cannot read {path}: {error.strerror or error}") from error


def build_request(args: argparse.Namespace, now: datetime) -> dict:
    """The request document (schemas/request.v1.schema.json)."""
    params: dict = {}
    if args.style is not None:
        params["style"] = args.style
    if args.style_image is not None:
        params["style_image"] = encoded_file(args.style_image)
    if args.strength is not None:
        params["strength"] = args.strength
    if args.size is not None:
        params["size"] = args.size

    request = {
        "version": CONTRACT_VERSION,
        "request_id": args.request_id if args.request_id is not None else str(uuid.uuid4()),
        "user_id": args.user,
        "model": args.model,
    }
    if params:
        request["params"] = params
    request["image"] = encoded_file(args.image)
    if args.deadline_seconds is not None:
        request["deadline"] = rfc3339(now + timedelta(seconds=args.deadline_seconds))
    request["created_at"] = rfc3339(now)
    return request


def publish(channel, queue: str, body: bytes, reply_to: str, correlation_id: str) -> None:
    """Publish persistently with mandatory=True and wait for the broker's confirm."""
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        reply_to=reply_to,
        correlation_id=correlation_id,
        timestamp=int(time.time()),
    )
    try:
        channel.basic_publish(exchange="", routing_key=queue, body=body, properties=properties, mandatory=True)
    except UnroutableError:
        raise Failure(f"queue {queue!r} does not exist: the broker returned the request as unroutable",
                      EXIT_NOT_ENQUEUED) from None
    except NackError:
        raise Failure(f"the broker refused the request (nack) on queue {queue!r}", EXIT_NOT_ENQUEUED) from None


FINAL_STATUSES = ("ok", "error")


def wait_for_reply(channel, reply_queue: str, correlation_id: str, timeout: float):
    """The final reply on `reply_queue` whose correlation_id matches, as (properties, body, document).

    Notices that are not final (`deferred`, or a status this script does not know) are reported on
    stderr and the wait goes on; `timeout` bounds the whole wait.
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
    return {"status": "ok", "out": str(out), "width": width, "height": height,
            "timings_ms": document.get("timings_ms")}


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else Path(args.image.stem + ".kiln.png")
    request = build_request(args, datetime.now(timezone.utc))
    body = json.dumps(request, separators=(",", ":")).encode("utf-8")
    correlation_id = str(uuid.uuid4())

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        reply_queue = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
        publish(channel, args.queue, body, reply_queue, correlation_id)
        properties, reply_body, document = wait_for_reply(channel, reply_queue, correlation_id, args.timeout)
    finally:
        if connection.is_open:
            connection.close()

    if document["status"] == "ok":
        summary, status = save_image(document, reply_body, out), EXIT_OK
    else:
        error = document.get("error") or {}
        summary = {"status": "error", "code": error.get("code"), "message": error.get("message")}
        status = EXIT_ERROR_REPLY
    print(json.dumps(summary), flush=True)
    return status


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
