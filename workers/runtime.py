"""What a worker process holds: its device, storage, batch progress and the warm model pool.

Made once per process on first use (after the prefork pool forks), never at import.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from functools import cached_property

from broker.progress import BatchProgress
from broker.settings import Settings
from storage import Storage, open_storage
from workers.device import compile_config
from workers.pool import ModelPool


@dataclass
class WorkerRuntime:
    settings: Settings
    device: str

    @cached_property
    def storage(self) -> Storage:
        return open_storage(self.settings.storage_url)

    @cached_property
    def progress(self) -> BatchProgress:
        return BatchProgress(self.settings.broker_url, ttl=self.settings.progress_ttl)

    @cached_property
    def pool(self) -> ModelPool:
        config = compile_config(self.device, cache_dir=self.settings.cache_dir / "ov-cache",
                                inference_precision=self.settings.inference_precision)
        return ModelPool(self.storage, cache_dir=self.settings.cache_dir, device=self.device, ov_config=config)

    @cached_property
    def hostname(self) -> str:
        return socket.gethostname()
