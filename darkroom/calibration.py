"""The producer's side of the INT8 lifecycle: enqueue a calibration, promote or roll back by hand."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from broker.app import make_app
from broker.progress import BatchProgress
from broker.settings import Settings
from storage import open_storage
from tasks.errors import InvalidRequest
from tasks.models import find_artifact, float_base, rollback, set_default
from tasks.names import CALIBRATE_QUEUE, CALIBRATE_TASK
from tasks.schemas import CalibrateJob, invalid_from_validation


def calibrate_job(name: str, **options: Any) -> CalibrateJob:
    """A validated calibration request; None options take the defaults."""
    gates = {k: options.pop(k) for k in ("min_speedup", "min_psnr_db", "max_adherence_drop")
             if options.get(k) is not None}
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return CalibrateJob.model_validate({"name": name, **options, **({"gates": gates} if gates else {})})
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


def submit_calibrate(job: CalibrateJob, *, settings: Settings | None = None) -> Any:
    """Check the model has a float artifact, then enqueue on the calibrate queue; returns the AsyncResult."""
    settings = settings or Settings.from_env()
    BatchProgress(settings.broker_url).ping()
    float_base(open_storage(settings.storage_url), job.name)
    return make_app(settings).send_task(CALIBRATE_TASK, kwargs={"job": job.model_dump()}, queue=CALIBRATE_QUEUE)


def promote(name: str, fingerprint: str, *, settings: Settings | None = None) -> dict[str, Any]:
    """Make an artifact the default by hand, whatever its gates said."""
    settings = settings or Settings.from_env()
    storage = open_storage(settings.storage_url)
    manifest = find_artifact(storage, name, fingerprint)
    if manifest["precision"] == "int8" and not manifest.get("passed", True):
        reason = "promoted by hand (its gates had rejected it)"
    else:
        reason = "promoted by hand"
    return set_default(storage, name, manifest["precision"], fingerprint, reason=reason)


def roll_back(name: str, *, settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings.from_env()
    try:
        return rollback(open_storage(settings.storage_url), name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="name") from None
