"""The calibration job: FP artifact -> INT8 artifact beside it, measured, gated, maybe promoted."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from broker.locks import HeartbeatLock
from storage import StorageError, StorageUnavailable, keys
from tasks.errors import DarkroomError, InvalidRequest, TransientError
from tasks.models import ModelRef, float_base, set_default
from tasks.schemas import CalibrateJob, invalid_from_validation
from tasks.version import __version__
from workers.runtime.context import WorkerRuntime

log = logging.getLogger(__name__)

CALIBRATION_VERSION = "1"


class InsufficientMemory(DarkroomError):
    """Not enough free memory to calibrate without being OOM-killed; not retried."""


class CalibrationBusy(DarkroomError):
    """Another calibration of this model holds its lock (a redelivery of a long job, or a second request)."""


def run_calibrate(payload: object, runtime: WorkerRuntime) -> dict[str, Any]:
    """One calibration at a time per model, never twice at once, skipped when nothing has changed."""
    try:
        job = CalibrateJob.model_validate(payload)
        name = keys.check_name("model", job.name)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="name") from None
    lock = HeartbeatLock(runtime.progress.client, f"darkroom:calibrating:{name}")
    if not lock.acquire():
        # Not a skip: if the running copy dies, this one must still happen (the task sends it again for later).
        raise CalibrationBusy(f"a calibration of {name!r} is already running")
    try:
        with lock:
            outcome = _calibrate(job, name, runtime)
    except StorageUnavailable as exc:
        raise TransientError(f"storage unavailable: {exc}") from exc
    except StorageError as exc:
        raise TransientError(f"storage error: {exc}") from exc
    except (InvalidRequest, InsufficientMemory) as exc:
        outcome = {"status": "failed", "error": str(exc)}
    return _log_run(runtime, name, job, outcome)


def _calibrate(job: CalibrateJob, name: str, runtime: WorkerRuntime) -> dict[str, Any]:
    from workers.calibrate.dataset import CalibrationDataError, load_calibration_prompts
    from workers.calibrate.quantize import (
        VALIDATION_SET,
        available_memory,
        calibrate_sd,
        estimate_peak_memory,
        measure,
        package_versions,
    )

    storage = runtime.storage
    # 1. The float artifact to start from, and the calibration prompts (cheap checks before heavy work).
    base = float_base(storage, name)
    if base.family == "wuerstchen":  # its denoisers are a prior and a decoder, not the UNet the plans quantize
        raise InvalidRequest(f"model {name!r} is a Wuerstchen model; INT8 calibration covers UNet-based families "
                             "only", field="name")
    try:
        prompts = load_calibration_prompts(job.dataset, job.subset_size)
    except CalibrationDataError as exc:
        raise InvalidRequest(str(exc), field="dataset") from None
    # 2. The INT8 artifact's fingerprint says what it was made from: unchanged inputs, nothing to do.
    fingerprint = _fingerprint(base, job, prompts.fingerprint)
    manifest_key = keys.model_artifact_manifest_key(name, "int8", fingerprint)
    if storage.exists(manifest_key) and not job.force:
        made = storage.get_json(manifest_key).get("created", "?")
        return {"status": "skipped", "fingerprint": fingerprint,
                "reason": f"unchanged since the calibration of {made} (model {base.precision} {base.fingerprint}, "
                          f"dataset {prompts.fingerprint}, same settings)"}
    # 3. Memory: fail clearly now rather than be OOM-killed halfway.
    fp_dir = runtime.pool.fetch(base.name, base.precision, base.fingerprint)
    need, have = estimate_peak_memory(fp_dir), available_memory()
    if need > have:
        raise InsufficientMemory(f"calibrating {name!r} needs about {need / 2**30:.1f} GiB of memory, "
                                 f"but only {have / 2**30:.1f} GiB is available on this worker")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="darkroom-calibrate-") as tmp:
        # 4. Calibrate on real pipeline inputs, then measure FP vs INT8 on this worker.
        result = calibrate_sd(fp_dir, Path(tmp) / "int8", prompts.prompts, mode=job.mode, steps=job.steps,
                              width=base.width, height=base.height, subset_size=job.subset_size,
                              core=runtime.pool.core, device=runtime.device)
        figures = measure(fp_dir, result.out_dir, width=base.width, height=base.height, steps=job.steps,
                          validation=VALIDATION_SET, core=runtime.pool.core, device=runtime.device)
        # 5. The gates decide; the reason is recorded either way.
        passed, reason = _gate(figures.image_speedup, figures.min_psnr_db, job)
        prefix = keys.model_artifact_prefix(name, "int8", fingerprint)
        adherence = _adherence_gate(fp_dir, result.out_dir, job, runtime, base.width, base.height)
        if adherence is not None:
            ok, why = adherence.pop("decision")
            failures = [text for text, good in ((why, ok), (reason, passed)) if not good]
            reason = "; ".join(failures) if failures else f"{reason}, {why}"
            passed = passed and ok
        # 6. Files, then the report, then the manifest (last: it makes the artifact visible).
        storage.upload_dir(result.out_dir, prefix)
        report = {
            "model": name, "fingerprint": fingerprint, "base": {"precision": base.precision,
                                                                "fingerprint": base.fingerprint},
            "mode": job.mode, "measurements": _as_json(figures), "gates": job.gates.model_dump(),
            "decision": {"passed": passed, "reason": reason}, "adherence": adherence,
            "settings": {"subset_size": job.subset_size, "steps": job.steps, "samples": result.samples,
                         "width": base.width, "height": base.height, "origin": job.origin},
            "dataset": {"source": prompts.source, "fingerprint": prompts.fingerprint, "prompts": len(prompts.prompts)},
            "versions": package_versions(), "seconds": round(time.perf_counter() - started, 2),
        }
        storage.put_json(keys.model_report_key(name, "int8", fingerprint), report)
        files = sorted(p.relative_to(result.out_dir).as_posix() for p in result.out_dir.rglob("*") if p.is_file())
        storage.put_json(manifest_key, {
            "name": name, "precision": "int8", "fingerprint": fingerprint, "family": base.family,
            "mode": job.mode, "base": report["base"], "passed": passed, "created": datetime.now(UTC).isoformat(),
            "files": files, "bytes": figures.int8_bytes, "defaults": {"width": base.width, "height": base.height,
                                                                      "scheduler": base.scheduler},
            "report": keys.ARTIFACT_REPORT, "darkroom_version": __version__,
        })
    # 7. Promotion only for an artifact that passed, and only if asked.
    promoted = passed and job.promote
    if promoted:
        set_default(storage, name, "int8", fingerprint, reason=f"calibrated ({job.origin}): {reason}")
    return {"status": "done", "fingerprint": fingerprint, "passed": passed, "promoted": promoted, "reason": reason,
            "uri": storage.uri(prefix), "measurements": report["measurements"]}


def _gate(speedup: float, psnr: float, job: CalibrateJob) -> tuple[bool, str]:
    gates = job.gates
    problems = []
    if speedup < gates.min_speedup:
        problems.append(f"speed-up {speedup:.2f}x is below {gates.min_speedup:.2f}x")
    if psnr < gates.min_psnr_db:
        problems.append(f"PSNR {psnr:.1f} dB is below {gates.min_psnr_db:.1f} dB")
    if problems:
        return False, "; ".join(problems)
    return True, (f"speed-up {speedup:.2f}x >= {gates.min_speedup:.2f}x, "
                  f"PSNR {psnr:.1f} dB >= {gates.min_psnr_db:.1f} dB")


def _adherence_gate(fp_dir: Path, int8_dir: Path, job: CalibrateJob, runtime: WorkerRuntime, width: int,
                    height: int) -> dict[str, Any] | None:
    """FP32 vs INT8 prompt adherence, when the model ships a scorer: figures, contact sheets (written into
    the INT8 folder, so they upload with it) and the decision."""
    from workers.demo_model.adherence import compare, gate

    runs = compare(fp_dir, int8_dir, width=width, height=height, core=runtime.pool.core, device=runtime.device)
    if runs is None:
        return None
    fp, int8 = runs
    sheets = {"fp32": "adherence/fp32.png", "int8": "adherence/int8.png"}
    (int8_dir / "adherence").mkdir(exist_ok=True)
    (int8_dir / sheets["fp32"]).write_bytes(fp.sheet_png)
    (int8_dir / sheets["int8"]).write_bytes(int8.sheet_png)
    decision = gate(fp.accuracy, int8.accuracy, job.gates.max_adherence_drop)
    return {"fp32": fp.accuracy, "int8": int8.accuracy, "drop": round(fp.accuracy - int8.accuracy, 2),
            "max_drop": job.gates.max_adherence_drop, "set": fp.summary["set"], "contact_sheets": sheets,
            "per_prompt": {p: {"fp32": e["accuracy"], "int8": int8.summary["per_prompt"][p]["accuracy"]}
                           for p, e in fp.summary["per_prompt"].items()},
            "decision": decision}


def _fingerprint(base: ModelRef, job: CalibrateJob, dataset_fingerprint: str) -> str:
    # The gates are not part of it: they judge an artifact, they do not change it.
    text = "|".join([CALIBRATION_VERSION, base.precision, base.fingerprint, job.mode, dataset_fingerprint,
                     str(job.subset_size), str(job.steps)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _as_json(figures: Any) -> dict[str, Any]:
    from dataclasses import asdict

    data = asdict(figures)
    data["validation"] = [list(pair) for pair in data.get("validation", ())]
    return data


def _log_run(runtime: WorkerRuntime, name: str, job: CalibrateJob, outcome: dict[str, Any]) -> dict[str, Any]:
    """Every run leaves a record under models/<name>/calibrations/, done, skipped or failed."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    record = {"at": stamp, "origin": job.origin, "mode": job.mode, "dataset": job.dataset,
              **{k: v for k, v in outcome.items() if k != "measurements"}}
    runtime.storage.put_json(keys.calibration_run_key(name, stamp), record)
    log.info("calibration of %s: %s", name, record)
    return outcome
