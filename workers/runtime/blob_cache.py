"""OpenVINO's compiled-blob cache, shared through storage so a new worker on a new machine starts warm.

OpenVINO writes a compiled model to its CACHE_DIR as `<hash>.blob` and imports it instead of compiling the
next time the same model is compiled with the same settings. Each artifact gets a cache folder of its own
here, and the blobs in it are mirrored to storage under a key made of the device, a digest of what makes a
blob portable (the device's full name and the OpenVINO version) and the artifact's fingerprint. A blob that
does not fit is no danger: OpenVINO checks it and compiles afresh.

On CPU the blobs are weightless (workers/runtime/device.py sets CACHE_MODE=OPTIMIZE_SIZE): importing one needs the
IR's weights, which `WeightsPathCore` points OpenVINO to (WEIGHTS_PATH) for every model read from an IR.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import Storage, StorageError, keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlobSync:
    """What one pull or push moved."""

    files: int
    bytes: int


def device_signature(core: Any, device: str) -> str:
    """A short digest of what a compiled blob depends on beyond the model: the device model and OpenVINO."""
    import openvino as ov

    try:
        name = str(core.get_property(device, "FULL_DEVICE_NAME"))
    except RuntimeError:  # a virtual device (AUTO, HETERO) has no single full name
        name = device
    return hashlib.sha256(f"{device}\n{name}\n{ov.get_version()}".encode()).hexdigest()[:16]


def is_weightless(ov_config: dict[str, Any]) -> bool:
    """Whether these compile properties ask for a weightless cache (CACHE_MODE=OPTIMIZE_SIZE)."""
    return str(ov_config.get("CACHE_MODE", "")).upper().endswith("OPTIMIZE_SIZE")


class WeightsPathCore:
    """An `openvino.Core` that remembers which IR each model was read from and, when a model is compiled with
    a weightless cache (CACHE_MODE=OPTIMIZE_SIZE), tells OpenVINO where its weights are (WEIGHTS_PATH).

    OpenVINO can import a weightless blob for an `ov.Model` only with WEIGHTS_PATH; without it, it compiles
    afresh every time and rewrites the blob. A model not read from an IR file here (built in Python, say) is
    compiled with a full blob instead (CACHE_MODE dropped). Everything else is the wrapped Core's.
    """

    def __init__(self, core: Any) -> None:
        self._core = core
        self._weights: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    def read_model(self, model: Any, weights: Any = None, config: dict[str, Any] | None = None) -> Any:
        read = self._core.read_model(model, weights, config)
        if isinstance(model, str | os.PathLike) and str(model).endswith(".xml"):
            bin_path = Path(weights) if isinstance(weights, str | os.PathLike) else Path(model).with_suffix(".bin")
            if bin_path.is_file():
                self._weights[read] = str(bin_path.resolve())
        return read

    def compile_model(self, model: Any, device_name: str | None = None, config: dict[str, Any] | None = None,
                      **kwargs: Any) -> Any:
        config = dict(config or {})
        if is_weightless(config) and "WEIGHTS_PATH" not in config and not isinstance(model, str | os.PathLike):
            weights = self._weights.get(model)
            if weights is None:  # no IR to map the weights from: a full blob, or every compile starts afresh
                config.pop("CACHE_MODE")
            else:
                config["WEIGHTS_PATH"] = weights
        return self._core.compile_model(model, device_name, config, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._core, name)


class SharedBlobCache:
    """Local per-artifact CACHE_DIR folders, mirrored to and from storage."""

    def __init__(self, storage: Storage, local_root: Path, *, device: str, signature: str,
                 share: bool = True) -> None:
        self.storage = storage
        self.local_root = local_root
        self.device = device
        self.signature = signature
        self.share = share
        self.weightless = False
        # Blobs as pulled (path -> mtime): one OpenVINO rewrote after the pull was unusable, and is pushed again.
        self._pulled: dict[Path, int] = {}

    def use_config(self, ov_config: dict[str, Any]) -> None:
        """Keep weightless blobs apart from full ones (OpenVINO names both alike): their own folders and keys."""
        self.weightless = is_weightless(ov_config)

    def local_dir(self, model: str, precision: str, fingerprint: str) -> Path:
        folder = self.local_root / self._prefix(model, precision, fingerprint)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def pull(self, model: str, precision: str, fingerprint: str) -> BlobSync:
        """Download the blobs storage has and this machine lacks; a storage problem only costs a compile."""
        if not self.share:
            return BlobSync(0, 0)
        prefix = self._prefix(model, precision, fingerprint)
        local = self.local_dir(model, precision, fingerprint)
        try:
            missing = [k for k in self.storage.list_keys(prefix) if not (local / keys.relative_key(prefix, k)).exists()]
            if not missing:
                return BlobSync(0, 0)
            staging = Path(tempfile.mkdtemp(prefix=".pull.", dir=local))
            try:
                self.storage.download_prefix(prefix, staging)
                moved = 0
                for path in staging.iterdir():
                    if not (local / path.name).exists():
                        moved += path.stat().st_size
                        os.replace(path, local / path.name)
                        self._pulled[local / path.name] = (local / path.name).stat().st_mtime_ns
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        except (StorageError, OSError) as exc:
            log.warning("compiled-blob cache: could not pull %s: %s (compiling instead)", prefix, exc)
            return BlobSync(0, 0)
        log.info("compiled-blob cache: pulled %d blob(s), %d bytes, for %s", len(missing), moved, prefix)
        return BlobSync(len(missing), moved)

    def push(self, model: str, precision: str, fingerprint: str) -> BlobSync:
        """Upload the blobs this machine compiled that storage lacks (after a compile finished writing them)."""
        if not self.share:
            return BlobSync(0, 0)
        prefix = self._prefix(model, precision, fingerprint)
        local = self.local_dir(model, precision, fingerprint)
        try:
            present = {keys.relative_key(prefix, k) for k in self.storage.list_keys(prefix)}
            new = sorted(p for p in local.iterdir() if p.is_file() and p.suffix == ".blob"
                         and (p.name not in present or self._replaced(p)))
            for path in new:
                self.storage.put_file(path, keys.compiled_blob_key(prefix, path.name))
        # A blob whose file name cannot be a key (InvalidName) is not shared; like a storage problem, that only
        # costs another worker a compile, never this job.
        except (StorageError, OSError, keys.InvalidName) as exc:
            log.warning("compiled-blob cache: could not push %s: %s", prefix, exc)
            return BlobSync(0, 0)
        return BlobSync(len(new), sum(p.stat().st_size for p in new))

    def _replaced(self, path: Path) -> bool:
        pulled = self._pulled.get(path)
        return pulled is not None and path.stat().st_mtime_ns != pulled

    def _prefix(self, model: str, precision: str, fingerprint: str) -> str:
        return keys.compiled_blob_prefix(self.device, self.signature, model, precision, fingerprint,
                                         weightless=self.weightless)
