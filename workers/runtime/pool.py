"""The model pool: compiled OpenVINO pipelines kept warm, keyed by (model, precision, device, shape)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import Storage, keys
from workers.runtime.blob_cache import SharedBlobCache, WeightsPathCore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolKey:
    model: str
    precision: str
    fingerprint: str
    device: str
    width: int
    height: int
    cfg: bool
    img2img: bool = False


@dataclass
class PoolStats:
    hits: int = 0
    compiles: int = 0
    fetches: int = 0
    evictions: int = 0
    blobs_pulled: int = 0
    blobs_pushed: int = 0


class ModelPool:
    """Loads each artifact from storage once, compiles each shape once, and keeps the newest `capacity`."""

    def __init__(self, storage: Storage, *, cache_dir: Path, device: str, ov_config: dict[str, str],
                 capacity: int = 4, core: Any | None = None, blob_cache: SharedBlobCache | None = None) -> None:
        self.storage = storage
        self.blob_cache = blob_cache
        if blob_cache is not None:
            blob_cache.use_config(ov_config)
        self.cache_dir = cache_dir
        self.device = device
        self.ov_config = ov_config
        self.capacity = capacity
        self.stats = PoolStats()
        self._core = core
        self._loader: WeightsPathCore | None = None
        self._entries: OrderedDict[PoolKey, Any] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def core(self) -> Any:
        if self._core is None:
            import openvino as ov

            self._core = ov.Core()
        return self._core

    @property
    def loader(self) -> WeightsPathCore:
        """The Core pipelines are loaded with: it points a weightless compiled-blob cache to each IR's weights."""
        if self._loader is None:
            self._loader = WeightsPathCore(self.core)
        return self._loader

    def get(self, model: str, precision: str, fingerprint: str, *, width: int, height: int, cfg: bool,
            img2img: bool = False) -> Any:
        """A compiled pipeline for this artifact and shape: from the pool, or fetched and compiled now."""
        from workers.pipelines.families import pipeline_for_artifact

        key = PoolKey(model, precision, fingerprint, self.device, width, height, cfg, img2img)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return self._entries[key]
            # 1. The IR on local disk (fetched from storage once per artifact).
            local = self.fetch(model, precision, fingerprint)
            # 2. Reshape to the static shape and compile: from the artifact's compiled blobs when this machine
            #    or another worker with the same device kind compiled it before (the shared blob cache).
            config = dict(self.ov_config)
            if self.blob_cache is not None:
                config["CACHE_DIR"] = str(self.blob_cache.local_dir(model, precision, fingerprint))
                self.stats.blobs_pulled += self.blob_cache.pull(model, precision, fingerprint).files
            pipeline_cls = pipeline_for_artifact(local, img2img=img2img)
            pipeline = pipeline_cls.load(local, device=self.device, width=width, height=height, cfg=cfg,
                                         core=self.loader, ov_config=config)
            self.stats.compiles += 1
            if self.blob_cache is not None:
                self.stats.blobs_pushed += self.blob_cache.push(model, precision, fingerprint).files
            # 3. Keep it, dropping the least recently used beyond capacity.
            self._entries[key] = pipeline
            while len(self._entries) > self.capacity:
                dropped, _ = self._entries.popitem(last=False)
                self.stats.evictions += 1
                log.info("model pool: evicted %s", dropped)
            return pipeline

    def fetch(self, model: str, precision: str, fingerprint: str) -> Path:
        """Download an artifact's files into the local cache, once; a finished download has its manifest.

        Several workers may share one cache: each downloads into a folder of its own and renames it into
        place; whoever loses the race uses the winner's copy (same fingerprint, same files).
        """
        prefix = keys.model_artifact_prefix(model, precision, fingerprint)
        target = self.cache_dir / prefix
        if (target / keys.ARTIFACT_MANIFEST).exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            self.storage.download_prefix(prefix, partial)
            if not (partial / keys.ARTIFACT_MANIFEST).exists():
                raise FileNotFoundError(f"artifact {prefix} in storage has no manifest (not converted, or deleted)")
            if target.exists() and not (target / keys.ARTIFACT_MANIFEST).exists():
                shutil.rmtree(target, ignore_errors=True)  # an incomplete copy from an older run
            try:
                partial.rename(target)
            except OSError:
                if not (target / keys.ARTIFACT_MANIFEST).exists():
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self.stats.fetches += 1
        return target

    def __len__(self) -> int:
        return len(self._entries)
