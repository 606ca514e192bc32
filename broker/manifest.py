"""A batch's manifest in storage, written last by whoever finishes the batch: a worker recording the last item,
or a producer whose cancel recorded the items no worker had started."""

from __future__ import annotations

from datetime import UTC, datetime

from broker.progress import BatchProgress
from storage import Storage, keys


def write_manifest(progress: BatchProgress, storage: Storage, batch_id: str) -> str:
    """The batch manifest: one entry per finished item, sorted by index; idempotent (same items, same entries)."""
    counts = progress.counts(batch_id)
    items = progress.items(batch_id)
    manifest = {
        "batch_id": batch_id, "state": counts.state if counts else "unknown",
        "total": counts.total if counts else len(items),
        "done": sum(i.status == "done" for i in items),
        "failed": sum(i.status == "failed" for i in items),
        "cancelled": sum(i.status == "cancelled" for i in items),
        "finished": datetime.now(UTC).isoformat(),
        "items": [i.model_dump() for i in items],
    }
    uri = storage.put_json(keys.batch_manifest_key(batch_id), manifest)
    # Producers waiting on the batch return once the manifest is in storage, not merely once Redis says done.
    progress.mark_manifest(batch_id, len(items))
    return uri
