"""What a worker process holds: its device, storage, batch progress and the warm model pool.

Made once per process on first use (after the prefork pool forks), never at import.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from functools import cached_property

from broker.progress import BatchProgress
from broker.settings import Settings
from broker.steering import BatchSteering
from broker.webhooks import TaskSender
from storage import Storage, open_storage
from workers.runtime.blob_cache import SharedBlobCache, device_signature
from workers.runtime.device import compile_config
from workers.runtime.pool import ModelPool


@dataclass
class WorkerRuntime:
    settings: Settings
    device: str
    # How job code sends a task (a batch's webhook event) without importing Celery: given by workers/celery_tasks.
    send_task: TaskSender | None = None

    @cached_property
    def storage(self) -> Storage:
        return open_storage(self.settings.storage_url)

    @cached_property
    def progress(self) -> BatchProgress:
        # A worker waits out a Redis restart (about 60 s) rather than failing an item it has rendered.
        return BatchProgress(self.settings.broker_url, ttl=self.settings.progress_ttl, ride_out=60)

    @cached_property
    def steering(self) -> BatchSteering:
        """The batches' cancel and pause marks, on the progress connection."""
        return BatchSteering(self.progress.client, ttl=self.settings.progress_ttl)

    @cached_property
    def pool(self) -> ModelPool:
        import openvino as ov

        core = ov.Core()
        # One local folder for OpenVINO's CACHE_DIR and the shared blob cache's per-artifact folders inside it.
        blob_root = self.settings.cache_dir / "ov-cache"
        config = compile_config(self.device, cache_dir=blob_root, inference_precision=self.settings.inference_precision)
        blobs = SharedBlobCache(self.storage, blob_root, device=self.device,
                                signature=device_signature(core, self.device),
                                share=self.settings.share_compiled_cache)
        return ModelPool(self.storage, cache_dir=self.settings.cache_dir, device=self.device, ov_config=config,
                         core=core, blob_cache=blobs)

    @cached_property
    def hostname(self) -> str:
        return socket.gethostname()
