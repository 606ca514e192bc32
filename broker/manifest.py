"""A batch's manifest in storage, written last by whoever finishes the batch: a worker recording the last item,
or a producer whose cancel recorded the items no worker had started."""

from __future__ import annotations

from datetime import UTC, datetime

from broker.progress import BatchProgress
from broker.webhooks import TaskSender, notify_batch
from storage import Storage, StorageError, StorageUnavailable, keys


def write_manifest(progress: BatchProgress, storage: Storage, batch_id: str, *,
                   send: TaskSender | None = None) -> str:
    """The batch manifest: one entry per finished item, sorted by index; idempotent (same items, same entries).
    `send`: how to send the batch's webhook task, if it has a webhook (broker.app.task_sender)."""
    counts = progress.counts(batch_id)
    items = progress.items(batch_id)
    manifest = {
        "batch_id": batch_id, "state": counts.state if counts else "unknown",
        "total": counts.total if counts else len(items),
        "done": sum(i.status == "done" for i in items),
        "failed": sum(i.status == "failed" for i in items),
        "cancelled": sum(i.status == "cancelled" for i in items),
        "items": [i.model_dump() for i in items],
        "finished": _finished_at(storage, keys.batch_manifest_key(batch_id)),
    }
    uri = storage.put_json(keys.batch_manifest_key(batch_id), manifest)
    # Producers waiting on the batch return once the manifest is in storage, not merely once Redis says done;
    # the epoch keeps a manifest written from counts that a retry has since reopened from marking the new outcome.
    progress.mark_manifest(batch_id, len(items), counts.epoch if counts else None)
    # The batch's webhook event (if its producer asked for one): once per epoch, whoever writes the manifest.
    notify_batch(progress, manifest, uri, counts.epoch if counts else 0, send)
    return uri


def _finished_at(storage: Storage, manifest_key: str) -> str:
    """When the batch finished (UTC), the time retention judges it by. A manifest written again (a late duplicate
    of an item) keeps the first one's time, so a re-run still writes the same bytes."""
    try:
        earlier = storage.get_json(manifest_key).get("finished")
    except StorageUnavailable:
        raise
    except (StorageError, AttributeError):
        earlier = None  # no manifest yet, or an unreadable one that this write replaces
    return earlier if isinstance(earlier, str) else datetime.now(UTC).isoformat()
