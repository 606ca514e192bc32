"""Steering a submitted batch: cancel it, pause it, resume it (the CLI's `darkroom cancel | pause | resume`).

- cancel: items not yet started never render, a running item stops at its next denoising step, and every item
  ends `cancelled` (or done/failed if it finished first); the manifest completes. Cancelling twice is a no-op.
- pause: items that reach a worker are parked, not rendered, and the worker goes on to other batches' items;
  a running item finishes. resume: the parked items are sent again, under their own task ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.app import task_sender
from broker.locks import item_lock_key
from broker.manifest import write_manifest
from broker.progress import BatchCounts, BatchProgress
from broker.settings import Settings
from broker.steering import CANCELLED, PAUSED, BatchSteering
from darkroom.records import record_jobs, record_queue, request_record
from darkroom.submit import send_jobs
from storage import ObjectNotFound, keys, open_storage
from tasks.errors import InvalidRequest
from tasks.names import PRIORITIES
from tasks.schemas import ItemResult


@dataclass(frozen=True)
class SteerResult:
    """What a steering operation did: the batch's state after it, and the items it touched."""

    batch_id: str
    state: str
    items: int  # cancel: items recorded cancelled by this call; resume: items sent again
    note: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "state": self.state, "items": self.items, "note": self.note}


def cancel(batch_id: str, *, settings: Settings | None = None) -> SteerResult:
    """Cancel a batch: InvalidRequest if it is unknown or already finished otherwise; a no-op if cancelled."""
    settings, progress, counts = _open(batch_id, settings)
    steering = BatchSteering(progress.client, ttl=settings.progress_ttl)
    if counts.finished >= counts.total:
        if counts.state == "cancelled":
            return SteerResult(batch_id, "cancelled", 0, "already cancelled")
        raise InvalidRequest(f"batch {batch_id!r} is already {counts.state}; there is nothing left to cancel",
                             field="batch")
    # 1. The mark first: from now on a worker that picks an item up records it cancelled, and a running one stops
    #    at its next step.
    steering.set(batch_id, CANCELLED)
    # 2. Items no worker holds are recorded cancelled now, so the batch finishes even with no worker listening;
    #    a worker that later receives one finds the mark and records the same. Held items stop by themselves.
    storage = open_storage(settings.storage_url)
    recorded, last = 0, counts
    statuses = progress.status_of(batch_id)
    for job in record_jobs(batch_id, request_record(storage, batch_id)).values():
        if job.index in statuses or progress.client.exists(item_lock_key(batch_id, job.index)):
            continue
        last = progress.record(ItemResult(batch_id=batch_id, index=job.index, status="cancelled",
                                          prompt=job.prompt, seed=job.seed, worker="cancelled by the producer"))
        recorded += 1
    # 3. The cancel finished the batch: its manifest, as the worker of a last item would write it.
    if last.total and last.finished >= last.total:
        write_manifest(progress, storage, batch_id, send=task_sender(settings))
    return SteerResult(batch_id, "cancelled" if last.finished >= last.total else "cancelling", recorded)


def pause(batch_id: str, *, settings: Settings | None = None) -> SteerResult:
    """Pause a running or queued batch; a no-op if paused; InvalidRequest if finished or cancelled."""
    settings, progress, counts = _open(batch_id, settings)
    steering = BatchSteering(progress.client, ttl=settings.progress_ttl)
    if counts.finished >= counts.total:
        raise InvalidRequest(f"batch {batch_id!r} is already {counts.state}; there is nothing left to pause",
                             field="batch")
    before = steering.set(batch_id, PAUSED)
    if before == CANCELLED:
        raise InvalidRequest(f"batch {batch_id!r} was cancelled; it cannot be paused", field="batch")
    return SteerResult(batch_id, "paused", 0, "already paused" if before == PAUSED else "")


def resume(batch_id: str, *, settings: Settings | None = None) -> SteerResult:
    """Resume a paused batch: its parked items are sent again. InvalidRequest if it is not paused."""
    settings, progress, counts = _open(batch_id, settings)
    steering = BatchSteering(progress.client, ttl=settings.progress_ttl)
    parked = steering.resume(batch_id)
    if parked is None:
        mark = steering.mark(batch_id)
        state = "cancelled" if mark == CANCELLED else counts.state
        raise InvalidRequest(f"batch {batch_id!r} is not paused (it is {state})", field="batch")
    storage = open_storage(settings.storage_url)
    record = request_record(storage, batch_id)
    jobs = [job for index, job in record_jobs(batch_id, record).items() if index in set(parked)]
    sent = send_jobs(jobs, settings, queue=record_queue(record, jobs)) if jobs else 0
    return SteerResult(batch_id, "running", sent)


def reprioritize(batch_id: str, priority: str, *, settings: Settings | None = None) -> SteerResult:
    """Move a batch's waiting items to another priority: each item no worker holds is sent again to the queue of
    `priority`; the copy left in the old queue is acknowledged without rendering when it comes (done already, or
    held by the copy running). A paused batch's parked items take the new priority when it resumes."""
    if priority not in PRIORITIES:
        raise InvalidRequest(f"unknown priority {priority!r}; choose one of {', '.join(PRIORITIES)}",
                             field="priority")
    settings, progress, counts = _open(batch_id, settings)
    if counts.finished >= counts.total:
        raise InvalidRequest(f"batch {batch_id!r} is already {counts.state}; there is nothing left to reorder",
                             field="batch")
    storage = open_storage(settings.storage_url)
    record = {**request_record(storage, batch_id), "priority": priority}
    storage.put_json(keys.batch_request_key(batch_id), record)
    steering = BatchSteering(progress.client, ttl=settings.progress_ttl)
    if steering.mark(batch_id) in (PAUSED, CANCELLED):
        return SteerResult(batch_id, steering.mark(batch_id) or "", 0, f"priority {priority} from now on")
    statuses = progress.status_of(batch_id)
    jobs = [job for index, job in record_jobs(batch_id, record).items() if index not in statuses
            and not progress.client.exists(item_lock_key(batch_id, index))]
    sent = send_jobs(jobs, settings, queue=record_queue(record, jobs)) if jobs else 0
    return SteerResult(batch_id, counts.state, sent, f"{sent} waiting item(s) moved to priority {priority}")


def _open(batch_id: str, settings: Settings | None) -> tuple[Settings, BatchProgress, BatchCounts]:
    """The settings, a progress client and the batch's counts; InvalidRequest naming an unknown batch."""
    settings = settings or Settings.from_env()
    try:
        keys.check_name("batch", batch_id)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="batch") from None
    progress = BatchProgress(settings.broker_url, ttl=settings.progress_ttl)
    progress.ping()
    counts = progress.counts(batch_id)
    if counts is None:
        # Gone from Redis: finished long ago (its manifest says how), or never submitted here.
        try:
            manifest = open_storage(settings.storage_url).get_json(keys.batch_manifest_key(batch_id))
        except ObjectNotFound:
            raise InvalidRequest(f"unknown batch {batch_id!r}", field="batch") from None
        raise InvalidRequest(f"batch {batch_id!r} is already {manifest.get('state', 'finished')}", field="batch")
    return settings, progress, counts
