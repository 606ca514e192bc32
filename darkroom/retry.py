"""retry(...): a finished batch's failed and dead-lettered items sent again; dead_letters(...): what was given up.

A retry re-sends the very jobs the batch's request record holds (same seed, same object keys, task id
`<batch>.<index>`), so an item that now succeeds is byte-identical to a first-time render. Before sending, the
items are reopened in Redis in one script (broker/reopen.py): their old results stop counting as finished and
their dead letters are removed, so `BatchHandle.wait()` waits for the new attempts and the worker that ends the
batch rewrites its manifest. A batch with unfinished items is refused, which is also what makes a second retry
while the first one's items are queued harmless: it sends nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.progress import BatchProgress
from broker.reopen import reopen_failed, restore_failed
from broker.settings import Settings
from broker.steering import CANCELLED, BatchSteering
from darkroom.batches import BatchHandle
from darkroom.records import record_jobs, record_queue, request_record
from darkroom.submit import send_jobs
from storage import keys, open_storage
from tasks.errors import InvalidRequest


@dataclass(frozen=True)
class DeadLetter:
    """An item whose worker process died on every attempt (as the worker recorded it)."""

    batch_id: str
    index: int
    error: str
    attempts: int
    prompt: str = ""
    at: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "index": self.index, "error": self.error, "attempts": self.attempts,
                "prompt": self.prompt, "at": self.at}


def retry(batch_id: str, *, failed: bool = True, dead: bool = True, settings: Settings | None = None) -> BatchHandle:
    """Send a finished batch's failed items (`failed`: those without a dead letter) and dead-lettered items
    (`dead`) again; the handle waits for their new attempts. Refused (InvalidRequest, nothing changed) for an
    unknown batch or one that still has items neither done nor failed."""
    settings = settings or Settings.from_env()
    batch_id = _check_batch(batch_id)
    if not (failed or dead):
        raise InvalidRequest("nothing to retry: ask for failed items, dead-lettered items or both", field="retry")
    progress = BatchProgress(settings.broker_url, ttl=settings.progress_ttl)
    progress.ping()
    if BatchSteering(progress.client).mark(batch_id) == CANCELLED:
        raise InvalidRequest(f"batch {batch_id!r} was cancelled; submit it again to render it", field="batch")
    # 1. The jobs to send again, from the request record in storage: read before anything changes.
    record = request_record(open_storage(settings.storage_url), batch_id, known=progress.exists(batch_id))
    jobs = record_jobs(batch_id, record)
    # 2. Reopen the chosen items; the finished-check is in the same script, so only one of two racing retries wins.
    reopened = reopen_failed(progress, batch_id, failed=failed, dead=dead)
    if reopened.state == "unknown":
        raise InvalidRequest(f"batch {batch_id!r} is no longer in the broker (its progress expired); submit it "
                             f"again with the same batch id to render what is missing", field="batch")
    if reopened.state == "running":
        raise InvalidRequest(f"batch {batch_id!r} is still running: {reopened.unfinished} of {reopened.total} "
                             "item(s) neither done nor failed; retry it once they have ended", field="batch")
    # 3. Send them again, by name, under their own task ids; if that fails, their old outcome is put back.
    try:
        missing = [i for i in reopened.indices if i not in jobs]
        if missing:
            raise InvalidRequest(f"the request record of batch {batch_id!r} has no job for item(s) {missing}",
                                 field="batch")
        resend = [jobs[i] for i in reopened.indices]
        sent = 0
        if resend:  # to the batch's own queue (records older than that field: its device's queue)
            sent = send_jobs(resend, settings, queue=record_queue(record, resend))
    except BaseException:
        restore_failed(progress, reopened)
        raise
    return BatchHandle(batch_id, reopened.total, settings, enqueued=sent, retried=tuple(reopened.indices),
                       _progress=progress)


def dead_letters(batch_id: str | None = None, settings: Settings | None = None) -> list[DeadLetter]:
    """The dead letters of one batch, or of every batch (found with SCAN), sorted by batch and item index."""
    settings = settings or Settings.from_env()
    progress = BatchProgress(settings.broker_url, ttl=settings.progress_ttl)
    progress.ping()
    if batch_id is None:
        batches = progress.batches_with_dead_letters()
    else:
        batches = [_check_batch(batch_id)]
        if not progress.exists(batches[0]) and not progress.dead_letters(batches[0]):
            request_record(open_storage(settings.storage_url), batches[0], known=False)  # unknown: one line
    letters = []
    for batch in batches:
        for index, entry in sorted(progress.dead_letters(batch).items()):
            job = entry.get("job") if isinstance(entry.get("job"), dict) else {}
            letters.append(DeadLetter(batch, index, str(entry.get("error", "")), int(entry.get("attempts") or 0),
                                      str(job.get("prompt", "")), entry.get("at")))
    return letters


def _check_batch(batch_id: str) -> str:
    try:
        return keys.check_name("batch", batch_id)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="batch") from None
