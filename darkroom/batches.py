"""A submitted batch seen from the producer: its counts, a blocking wait, and its summary (Redis, then storage)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from pydantic import ValidationError

from broker.progress import BatchCounts, BatchProgress
from broker.settings import Settings
from broker.steering import CANCELLED, PAUSED, BatchSteering
from broker.webhooks import webhook_status
from storage import ObjectNotFound, StorageError, keys, open_storage
from tasks.errors import InvalidRequest, ServiceUnavailable
from tasks.schemas import ItemResult, invalid_from_validation

# How long a waiting producer keeps reconnecting to a Redis that went away before it gives up.
RECONNECT_FOR = 120.0
# How long wait() gives a finished batch's manifest to appear in storage before returning without it.
MANIFEST_GRACE = 60.0


@dataclass(frozen=True)
class BatchSummary:
    batch_id: str
    state: str
    total: int
    done: int
    failed: int
    items: tuple[ItemResult, ...]
    invalid: tuple[str, ...] = ()
    cancelled: int = 0
    # The last outcome of each webhook event: {event: {id, status, attempts, last_error, at}} (while in Redis).
    webhooks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id, "state": self.state, "total": self.total, "done": self.done,
            "failed": self.failed, "cancelled": self.cancelled, "invalid": list(self.invalid),
            "webhooks": self.webhooks,
            "items": [i.model_dump(include={"index", "prompt", "seed", "status", "uri", "error", "warnings"})
                      for i in self.items],
        }


@dataclass
class BatchHandle:
    """A submitted batch: poll it, wait for it, read its results."""

    batch_id: str
    total: int
    settings: Settings
    invalid: tuple[str, ...] = ()
    enqueued: int = 0
    # The items a retry sent again (darkroom.retry).
    retried: tuple[int, ...] = ()
    _progress: BatchProgress | None = field(default=None, repr=False)

    @property
    def progress(self) -> BatchProgress:
        if self._progress is None:
            self._progress = BatchProgress(self.settings.broker_url, ttl=self.settings.progress_ttl)
        return self._progress

    def counts(self) -> BatchCounts:
        return batch_counts(self.batch_id, self.settings, self.progress)

    def wait(self, *, timeout: float | None = None, poll: float = 0.5,
             on_progress: Callable[[BatchCounts], None] | None = None) -> BatchSummary:
        """Block until every item is done, failed or cancelled; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        broken_since: float | None = None
        finished_at: float | None = None
        while True:
            try:
                counts = self.counts()
                broken_since = None
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis restarting (or LOADING its AOF): keep waiting and reconnect, for up to RECONNECT_FOR s.
                broken_since = broken_since or time.monotonic()
                if time.monotonic() - broken_since > RECONNECT_FOR:
                    raise ServiceUnavailable(f"lost the broker for more than {RECONNECT_FOR:.0f} s while waiting "
                                             f"for batch {self.batch_id} ({type(exc).__name__})") from None
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"batch {self.batch_id}: broker unreachable at the {timeout:.0f} s "
                                       "timeout") from None
                time.sleep(poll)
                continue
            if on_progress:
                on_progress(counts)
            if counts.total and counts.finished >= counts.total:
                # The manifest is written just after the last item is counted: wait for it, so a caller can
                # read it at once; a manifest that never comes (storage gone) does not block for good.
                finished_at = finished_at or time.monotonic()
                now = time.monotonic()
                if (counts.in_manifest >= counts.total or now - finished_at > MANIFEST_GRACE
                        or (deadline is not None and now > deadline)):
                    return self.summary()
            else:
                # Items reopened by a retry are unfinished again: their manifest grace starts when they end.
                finished_at = None
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"batch {self.batch_id}: {counts.finished}/{counts.total} finished "
                                   f"after {timeout:.0f} s")
            time.sleep(poll)

    def summary(self) -> BatchSummary:
        return batch_summary(self.batch_id, self.settings, self.progress, invalid=self.invalid)


def batch_counts(batch_id: str, settings: Settings, progress: BatchProgress | None = None) -> BatchCounts:
    progress = progress or BatchProgress(settings.broker_url)
    counts = progress.counts(batch_id)
    if counts is not None:
        return counts
    manifest = _manifest(batch_id, settings)
    return BatchCounts(batch_id, manifest["total"], manifest["done"], manifest["failed"],
                       cancelled=manifest.get("cancelled", 0))


def batch_summary(batch_id: str, settings: Settings, progress: BatchProgress | None = None,
                  invalid: tuple[str, ...] = ()) -> BatchSummary:
    """Progress from Redis while the batch is fresh, else the manifest from storage."""
    progress = progress or BatchProgress(settings.broker_url)
    counts = progress.counts(batch_id)
    if counts is not None:
        items = tuple(progress.items(batch_id))
        return BatchSummary(batch_id, live_state(counts, progress), counts.total, counts.done, counts.failed, items,
                            invalid, counts.cancelled, webhook_status(progress.client, batch_id))
    manifest = _manifest(batch_id, settings)
    try:
        items = tuple(ItemResult.model_validate(i) for i in manifest["items"])
    except ValidationError as exc:  # a manifest edited or damaged in storage: one line, no traceback
        raise InvalidRequest(f"the manifest of batch {batch_id!r} in storage is malformed: "
                             f"{invalid_from_validation(exc)}", field="batch") from None
    return BatchSummary(batch_id, manifest["state"], manifest["total"], manifest["done"], manifest["failed"],
                        items, invalid, manifest.get("cancelled", 0))


def live_state(counts: BatchCounts, progress: BatchProgress) -> str:
    """The batch's state from its counts, or `paused` / `cancelling` while a producer's mark holds it."""
    if counts.total and counts.finished >= counts.total:
        return counts.state
    mark = BatchSteering(progress.client).mark(counts.batch_id)
    return {PAUSED: "paused", CANCELLED: "cancelling"}.get(mark or "", counts.state)


def _manifest(batch_id: str, settings: Settings) -> dict[str, Any]:
    try:
        key = keys.batch_manifest_key(keys.check_name("batch", batch_id))
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="batch") from None
    storage = open_storage(settings.storage_url)
    try:
        return storage.get_json(key)
    except ObjectNotFound:
        pass
    except StorageError as exc:
        raise ServiceUnavailable(str(exc)) from None
    try:
        request = storage.get_json(keys.batch_request_key(batch_id))
    except ObjectNotFound:
        raise InvalidRequest(f"unknown batch {batch_id!r}", field="batch") from None
    total = request["total"]
    return {"total": total, "done": 0, "failed": 0, "state": "unknown", "items": []}
