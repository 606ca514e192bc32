"""Webhooks: a batch's events POSTed to the URL its producer named, signed, delivered at least once.

Both sides use this module: a producer checks the URL at submit (`check_url`), the code that finishes a batch or
an item enqueues the event (`notify_batch`, `notify_item`: the task `darkroom.webhook` on the batch's own high
priority queue), and the worker that takes that task POSTs it (`deliver`) and keeps the outcome in Redis
(`webhook_status`, shown by `darkroom status`). Signing follows Stripe's scheme: header
`X-Darkroom-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

from broker.progress import BatchProgress, batch_key
from tasks.names import BATCH_WEBHOOK_EVENTS, ITEM_DONE_EVENT, WEBHOOK_TASK, priority_queue

log = logging.getLogger(__name__)

# Sends a task by name: (task name, kwargs, queue, task id). Given by the caller (broker.app.task_sender) so that
# the code that finishes a batch on a worker, which runs without Celery, never imports it.
TaskSender = Callable[[str, dict[str, Any], str, str], None]

SIGNATURE_HEADER = "X-Darkroom-Signature"
WEBHOOK_URL_ENV = "DARKROOM_WEBHOOK_URL"  # the producer's default webhook, when a request names none
SECRET_ENV = "DARKROOM_WEBHOOK_SECRET"
ALLOW_ENV = "DARKROOM_WEBHOOK_ALLOW"
RETRY_FOR_ENV = "DARKROOM_WEBHOOK_RETRY_FOR"
BACKOFF_ENV = "DARKROOM_WEBHOOK_BACKOFF"
DEFAULT_RETRY_FOR = 3600.0
DEFAULT_BACKOFF = 2.0
MAX_BACKOFF = 600.0
TIMEOUT = 10.0

# A finished batch's state -> the event it sends.
STATE_EVENTS = {"completed": BATCH_WEBHOOK_EVENTS[0], "completed_with_failures": BATCH_WEBHOOK_EVENTS[1],
                "cancelled": BATCH_WEBHOOK_EVENTS[2]}

# Link-local (169.254.0.0/16 holds the AWS/GCP/Azure metadata service, fe80::/10) and the cloud metadata
# addresses outside it (AWS's IPv6 one, Alibaba's): a webhook must not make a worker read its own credentials.
_FORBIDDEN = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
              ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))


class WebhookRefused(ValueError):
    """A URL darkroom will not POST to (scheme, or a host that resolves to a link-local or metadata address)."""


def allowed_hosts() -> set[str]:
    return {h.strip().lower() for h in os.environ.get(ALLOW_ENV, "").split(",") if h.strip()}


def check_url(url: str, *, allow: set[str] | None = None) -> str:
    """The URL if darkroom may POST to it, else WebhookRefused saying why. Resolves the host: run it at submit
    and again before every delivery, since what a name resolves to can change in between."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused(f"{url!r}: only http:// and https:// URLs are allowed")
    host = (parts.hostname or "").lower()
    if not host:
        raise WebhookRefused(f"{url!r} has no host")
    if host in (allowed_hosts() if allow is None else allow):
        return url
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError) as exc:
        raise WebhookRefused(f"{url!r}: cannot resolve {host!r} ({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:169.254.169.254 is the same place
        for candidate in (address, mapped):
            if candidate is not None and any(candidate in net for net in _FORBIDDEN):
                raise WebhookRefused(f"{url!r}: {host} resolves to {candidate}, a link-local or cloud metadata "
                                     f"address (name the host in {ALLOW_ENV} to allow it)")
    return url


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, tolerance: float = 300.0, now: float | None = None) -> bool:
    """What a receiver does: the header's v1 is the HMAC of "<t>.<body>", and t is recent (against replays)."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).rsplit("v1=", 1)[1]
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


def event_id(batch_id: str, event: str, epoch: int, index: int | None = None) -> str:
    """Deterministic: a batch finished twice (a late duplicate rewrites its manifest) sends the same id; a retry
    that reopens the batch raises its epoch, so its new outcome is a new event."""
    return f"{batch_id}:{event}:{epoch}" if index is None else f"{batch_id}:{event}:{index}:{epoch}"


def batch_data(manifest: dict[str, Any], uri: str) -> dict[str, Any]:
    return {"batch_id": manifest["batch_id"], "state": manifest["state"], "total": manifest["total"],
            "done": manifest["done"], "failed": manifest["failed"], "cancelled": manifest["cancelled"],
            "manifest": uri}


def notify_batch(progress: BatchProgress, manifest: dict[str, Any], uri: str, epoch: int,
                 send: TaskSender | None) -> None:
    """A finished batch's event, if its producer asked for it. `created` is the manifest's first `finished` time,
    so the same event always has the same body too. Never raises: a webhook never fails a batch."""
    event = STATE_EVENTS.get(manifest["state"])
    if event is not None:
        _notify(progress, send, manifest["batch_id"], event, epoch, None, manifest["finished"],
                batch_data(manifest, uri))


def notify_item(progress: BatchProgress, send: TaskSender | None, batch_id: str, index: int, uri: str | None,
                counts: Any) -> None:
    """`item.done` for a rendered item, if asked for (`--webhook-events item.done,...`). Never raises."""
    data = {"batch_id": batch_id, "index": index, "uri": uri, "total": counts.total, "done": counts.done,
            "failed": counts.failed, "cancelled": counts.cancelled, "state": counts.state}
    _notify(progress, send, batch_id, ITEM_DONE_EVENT, None, index, None, data)


def _notify(progress: BatchProgress, send: TaskSender | None, batch_id: str, event: str, epoch: int | None,
            index: int | None, created: str | None, data: dict[str, Any]) -> None:
    try:
        meta = progress.meta(batch_id)
        url = meta.get("webhook")
        if not url or event not in (meta.get("webhook_events") or BATCH_WEBHOOK_EVENTS):
            return
        if send is None:
            log.warning("batch %s: webhook %s not sent: this caller cannot send tasks", batch_id, event)
            return
        if epoch is None:
            counts = progress.counts(batch_id)
            epoch = counts.epoch if counts else 0
        eid = event_id(batch_id, event, epoch, index)
        # One enqueue per event id: a late duplicate of the last item writes the manifest again but sends nothing
        # new (receivers still de-duplicate by id: a POST whose answer was lost is sent again).
        sent = batch_key(batch_id, "webhook:sent")
        if not progress.client.sadd(sent, eid):
            return
        progress.client.expire(sent, progress.ttl)
        body = {"id": eid, "type": event, "data": data,
                "created": created or time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())}
        delivery = {"batch_id": batch_id, "url": url, "body": body, "first": time.time()}
        queue = priority_queue(meta.get("queue") or "generate.CPU", "high")
        # Recorded before sending: a fast worker's "delivered" must not be overwritten by this "queued".
        record_status(progress.client, batch_id, event, "retrying", 0, "queued", progress.ttl, eid)
        try:
            send(WEBHOOK_TASK, {"delivery": delivery}, queue, f"webhook.{eid}")
        except Exception as exc:
            progress.client.srem(sent, eid)  # not sent: the next writer of the manifest may send it
            record_status(progress.client, batch_id, event, "failed", 0, f"not enqueued: {exc}", progress.ttl, eid)
            raise
    except Exception as exc:  # noqa: BLE001 - the batch's outcome stands whatever its webhook does
        log.warning("batch %s: could not enqueue webhook %s: %s", batch_id, event, exc)


def status_key(batch_id: str) -> str:
    """A hash: event type -> JSON {id, status (delivered|retrying|failed), attempts, last_error, at}."""
    return batch_key(batch_id, "webhook")


def record_status(client: redis.Redis, batch_id: str, event: str, status: str, attempts: int, error: str,
                  ttl: int, eid: str) -> None:
    value = {"id": eid, "status": status, "attempts": attempts, "last_error": error,
             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    client.hset(status_key(batch_id), event, json.dumps(value))
    client.expire(status_key(batch_id), ttl)


def webhook_status(client: redis.Redis, batch_id: str) -> dict[str, dict[str, Any]]:
    return {k.decode() if isinstance(k, bytes) else k: json.loads(v)
            for k, v in client.hgetall(status_key(batch_id)).items()}


@dataclass(frozen=True)
class PostOutcome:
    delivered: bool
    retryable: bool
    error: str = ""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect could point anywhere, past the address check: a 3xx is an answer, not followed.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


def post(url: str, body: bytes, *, secret: str | None, timeout: float = TIMEOUT) -> PostOutcome:
    """One POST. Retryable: timeouts, connection errors, 5xx, 408 and 429; any other 4xx (or 3xx) is final."""
    try:
        check_url(url)
    except WebhookRefused as exc:
        return PostOutcome(False, "cannot resolve" in str(exc), str(exc))
    headers = {"Content-Type": "application/json", "User-Agent": "darkroom-webhook"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, int(time.time()), body)
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read(65536)
            return PostOutcome(True, False)
    except urllib.error.HTTPError as exc:
        return PostOutcome(False, exc.code >= 500 or exc.code in (408, 429), f"HTTP {exc.code}")
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return PostOutcome(False, True, f"{type(reason).__name__}: {reason}")


def backoff(attempt: int, cap: float = MAX_BACKOFF) -> float:
    """Seconds before attempt `attempt + 1`: base, 2 x base, 4 x base, ... capped at `cap`."""
    base = float(os.environ.get(BACKOFF_ENV, DEFAULT_BACKOFF))
    return min(base * 2.0 ** (attempt - 1), cap)


def deliver(delivery: dict[str, Any], client: redis.Redis, *, attempt: int, ttl: int,
            max_wait: float = MAX_BACKOFF) -> float | None:
    """One delivery attempt; its outcome recorded. Seconds until the next attempt, or None when this was the last
    (delivered, refused, or past DARKROOM_WEBHOOK_RETRY_FOR since the event was enqueued). `max_wait`: the
    longest wait; a worker passes half its visibility timeout, since Redis hands a message held longer than that
    to another worker (two copies of one delivery, both retrying)."""
    body, batch_id = delivery["body"], delivery["batch_id"]
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    outcome = post(delivery["url"], raw, secret=os.environ.get(SECRET_ENV) or None)
    event, eid = body["type"], body["id"]
    if outcome.delivered:
        record_status(client, batch_id, event, "delivered", attempt, "", ttl, eid)
        return None
    retry_for = float(os.environ.get(RETRY_FOR_ENV, DEFAULT_RETRY_FOR))
    wait = backoff(attempt, min(max_wait, MAX_BACKOFF))
    if outcome.retryable and time.time() + wait - float(delivery["first"]) <= retry_for:
        record_status(client, batch_id, event, "retrying", attempt, outcome.error, ttl, eid)
        return wait
    record_status(client, batch_id, event, "failed", attempt, outcome.error, ttl, eid)
    log.warning("webhook %s of batch %s failed after %d attempt(s): %s", eid, batch_id, attempt, outcome.error)
    return None
