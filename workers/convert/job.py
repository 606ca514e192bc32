"""The conversion job: a diffusers model to OpenVINO IR in storage, manifest last."""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from storage import StorageError, StorageUnavailable, keys
from tasks.errors import InvalidRequest, TransientError
from tasks.models import default_of, set_default
from tasks.schemas import ConvertJob, invalid_from_validation
from tasks.version import __version__
from workers.pipelines.schedulers import native_scheduler
from workers.runtime.context import WorkerRuntime


def run_convert(payload: object, runtime: WorkerRuntime) -> dict[str, Any]:
    """Convert once per fingerprint: a re-run of the same source finds the manifest and stops there."""
    from workers.convert.sd import SourceNotFound, resolve_source
    from workers.pipelines.families import UnknownFamily, check_family, get_family, load_attr

    started = time.perf_counter()
    # 1. Parse and resolve the source on this worker (local folder or Hugging Face cache).
    try:
        job = ConvertJob.model_validate(payload)
        name = keys.check_name("model", job.name)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="name") from None
    try:
        source_dir = resolve_source(job.source)
    except SourceNotFound as exc:
        raise InvalidRequest(str(exc), field="source") from None
    try:
        # The family detected from model_index.json; a requested family (--family) must be that one.
        family = get_family(check_family(source_dir, job.family))
    except UnknownFamily as exc:
        raise InvalidRequest(str(exc), field="family" if job.family else "source") from None
    try:
        fingerprint = load_attr(family.fingerprint)(source_dir, weight_format=job.weight_format)
    except ValueError as exc:  # a source of the family its converter cannot read, e.g. a Wuerstchen decoder alone
        raise InvalidRequest(str(exc), field="source") from None
    precision = job.weight_format
    manifest_key = keys.model_artifact_manifest_key(name, precision, fingerprint)
    storage = runtime.storage
    try:
        # 2. Already converted: nothing to do (a re-delivered job costs one lookup).
        fresh = not storage.exists(manifest_key)
        if not fresh:
            manifest = storage.get_json(manifest_key)
        else:
            # 3. Convert into a temporary folder, upload every file, then the manifest.
            with tempfile.TemporaryDirectory(prefix="darkroom-convert-") as tmp:
                result = load_attr(family.convert)(source_dir, Path(tmp) / "ir", weight_format=job.weight_format)
                prefix = keys.model_artifact_prefix(name, precision, fingerprint)
                storage.upload_dir(result.out_dir, prefix)
                manifest = _manifest(job, name, precision, fingerprint, result.out_dir, result.family)
                manifest["convert_seconds"] = round(time.perf_counter() - started, 3)
            storage.put_json(manifest_key, manifest)
        # 4. A new conversion becomes the default unless asked otherwise (a repeat leaves, say, a promoted
        #    INT8 default alone).
        if job.make_default and (fresh or default_of(storage, name) is None):
            set_default(storage, name, precision, fingerprint, reason=f"converted from {job.source}")
    except StorageUnavailable as exc:
        raise TransientError(f"storage unavailable: {exc}") from exc
    except StorageError as exc:
        raise TransientError(f"storage error: {exc}") from exc
    return {"name": name, "precision": precision, "fingerprint": fingerprint,
            "uri": storage.uri(keys.model_artifact_prefix(name, precision, fingerprint)),
            "family": manifest.get("family", "sd"), "defaults": manifest.get("defaults", {})}


def _manifest(job: ConvertJob, name: str, precision: str, fingerprint: str, ir_dir: Path,
              family: str) -> dict[str, Any]:
    import openvino as ov

    files = sorted(p.relative_to(ir_dir).as_posix() for p in ir_dir.rglob("*") if p.is_file())
    return {
        "name": name, "precision": precision, "fingerprint": fingerprint, "family": family,
        "source": job.source, "created": datetime.now(UTC).isoformat(), "files": files,
        "bytes": sum((ir_dir / f).stat().st_size for f in files),
        "defaults": model_defaults(ir_dir, family), "darkroom_version": __version__,
        "openvino_version": ov.get_version(),
    }


def model_defaults(ir_dir: Path, family: str = "sd") -> dict[str, Any]:
    """Native size and scheduler of a converted model, for requests that do not set them."""
    if family == "wuerstchen":  # trained at 1024x1024; its stages run one scheduler of their own
        from tasks.families import WUERSTCHEN_SCHEDULER, WUERSTCHEN_SIDE

        return {"width": WUERSTCHEN_SIDE, "height": WUERSTCHEN_SIDE, "scheduler": WUERSTCHEN_SCHEDULER}
    unet = json.loads((ir_dir / "unet" / "config.json").read_text())
    vae = json.loads((ir_dir / "vae_decoder" / "config.json").read_text())
    scale = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    sample = unet.get("sample_size", 64)
    side = (sample if isinstance(sample, int) else sample[0]) * scale
    return {"width": side, "height": side, "scheduler": native_scheduler(ir_dir)}
