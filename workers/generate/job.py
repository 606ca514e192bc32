"""The generation job: one item of a batch rendered on OpenVINO and written to storage."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from pydantic import ValidationError

from broker.manifest import write_manifest
from broker.steering import CANCELLED, PAUSED
from broker.webhooks import notify_item
from storage import StorageError, StorageUnavailable, keys
from tasks.errors import InvalidRequest, TransientError
from tasks.schemas import GenerateJob, ItemResult, invalid_from_validation
from tasks.version import __version__
from workers.generate.control import control_inputs
from workers.generate.img2img import img2img_inputs, img2img_metadata
from workers.generate.prompt_length import prompt_warnings
from workers.generate.wuerstchen import wuerstchen_inputs
from workers.pipelines.interrupt import Interrupted
from workers.pipelines.png import encode_png
from workers.runtime import faults, metrics
from workers.runtime.context import WorkerRuntime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateOutcome:
    result: ItemResult
    finished_batch: bool
    # The batch is paused: the item was parked, not rendered; `darkroom resume` sends it again.
    parked: bool = False


def parse_job(payload: object) -> GenerateJob:
    try:
        return GenerateJob.model_validate(payload)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


def run_generate(payload: object, runtime: WorkerRuntime, *, attempt: int = 1) -> GenerateOutcome:
    """Render one item. InvalidRequest for a job that can never succeed; TransientError to retry."""
    started = time.perf_counter()
    # 1. Parse: a worker trusts nothing on the wire.
    job = parse_job(payload)
    storage = runtime.storage
    image_key = keys.image_key(job.batch_id, job.index)
    record_key = keys.item_record_key(job.batch_id, job.index)
    try:
        # 2. A re-delivered job whose record exists is done already: same key, same bytes.
        if storage.exists(record_key):
            result = ItemResult.model_validate(storage.get_json(record_key))
            return _record(runtime, result)
        # 3. A cancelled batch's item is recorded as such without loading a model; a paused batch's is parked,
        #    so this worker goes on to the next batch's item.
        steer = runtime.steering.park_or_go(job.batch_id, job.index)
        if steer == CANCELLED:
            return record_cancelled(job, runtime, attempt=attempt)
        if steer == PAUSED:
            log.info("item %s.%s: batch paused; parked until it resumes", job.batch_id, job.index)
            return GenerateOutcome(ItemResult(batch_id=job.batch_id, index=job.index, status="cancelled",
                                              prompt=job.prompt, seed=job.seed), False, parked=True)
        # 4. The warm pipeline for this artifact and shape.
        pipeline = runtime.pool.get(job.model, job.precision, job.fingerprint, width=job.width,
                                    height=job.height, cfg=job.guidance > 1.0, img2img=job.init_image is not None)
        warnings = prompt_warnings(pipeline, job)  # tokens past the model's limit: reported, never silent
        # 5. Render; a cancel stops it at the next denoising step (one Redis GET per step), nothing written.
        control = control_inputs(job, runtime, pipeline)  # ControlNet: the (annotated, cached) control image
        prior = wuerstchen_inputs(job, pipeline)  # Wuerstchen: the prior's steps and guidance
        try:
            out = faults.wrap(pipeline, job).generate(
                job.prompt, negative_prompt=job.negative_prompt, steps=job.steps, guidance_scale=job.guidance,
                scheduler=job.scheduler, seed=job.seed, **control, **prior, **img2img_inputs(job, storage),
                should_stop=lambda: runtime.steering.is_cancelled(job.batch_id))
        except Interrupted:
            log.info("item %s.%s: batch cancelled mid-render; nothing written", job.batch_id, job.index)
            return record_cancelled(job, runtime, attempt=attempt)
        image, marked = _watermark(out.image, job)  # optional invisible watermark, recorded in the metadata
        # 6. Image first, then its record: a record always points at a whole image.
        png = encode_png(image, {**png_metadata(job, runtime.device), **img2img_metadata(job), **marked})
        uri = storage.put_bytes(image_key, png, content_type="image/png")
        result = ItemResult(batch_id=job.batch_id, index=job.index, status="done", prompt=job.prompt,
                            seed=job.seed, uri=uri, worker=f"{runtime.hostname}:{os.getpid()}",
                            seconds=round(time.perf_counter() - started, 4), attempts=attempt, warnings=warnings)
        storage.put_json(record_key, result.model_dump())
        metrics.observe_image(runtime.device, job.model, out.timings, job.steps)
        # Inside the try: a manifest write that meets a storage outage is retried like the image was.
        return _record(runtime, result)
    except StorageUnavailable as exc:
        raise TransientError(f"storage unavailable: {exc}") from exc
    except FileNotFoundError as exc:
        raise InvalidRequest(str(exc), field="model") from None
    except StorageError as exc:
        raise TransientError(f"storage error: {exc}") from exc


def _watermark(image: object, job: GenerateJob) -> tuple[object, dict[str, object]]:
    from workers.pipelines import watermark

    try:
        return watermark.apply(image, job.watermark)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="watermark") from None


def record_cancelled(job: GenerateJob, runtime: WorkerRuntime, *, attempt: int) -> GenerateOutcome:
    """An item of a cancelled batch: counted as finished (`cancelled`), with no image and no record in storage."""
    result = ItemResult(batch_id=job.batch_id, index=job.index, status="cancelled", prompt=job.prompt,
                        seed=job.seed, worker=f"{runtime.hostname}:{os.getpid()}", attempts=attempt)
    return _record(runtime, result)


def record_failure(payload: object, runtime: WorkerRuntime, error: str, *, attempt: int) -> GenerateOutcome:
    """Report an item that will not be rendered, so the batch still finishes and says why."""
    batch_id, index, prompt, seed = _identity(payload)
    if batch_id is None or index is None:
        log.error("dropping a generation message without batch id or index: %s", error)
        return GenerateOutcome(ItemResult(batch_id="?", index=-1, status="failed", error=error), False)
    result = ItemResult(batch_id=batch_id, index=index, status="failed", prompt=prompt, seed=seed,
                        error=error, worker=f"{runtime.hostname}:{os.getpid()}", attempts=attempt)
    return _record(runtime, result)


def dead_letter(payload: object, runtime: WorkerRuntime, error: str, *, attempts: int) -> GenerateOutcome:
    """An item whose worker process died on every attempt: a dead-letter record, and the item marked failed."""
    from workers.runtime.delivery import record_dead_letter

    message = f"dead letter after {attempts} attempts: {error}"
    log.error("item %s: %s", _identity(payload)[:2], message)
    if isinstance(payload, dict):
        record_dead_letter(runtime.progress.client, payload, error, attempts, runtime.settings.progress_ttl)
    return record_failure(payload, runtime, message, attempt=attempts)


def png_metadata(job: GenerateJob, device: str) -> dict[str, object]:
    # What reproduces the image, and nothing else (no batch id, no time): the same request gives the same bytes.
    meta: dict[str, object] = {
        "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": job.seed, "steps": job.steps,
        "guidance": job.guidance, "scheduler": job.scheduler, "width": job.width, "height": job.height,
        "model": job.model, "model_fingerprint": job.fingerprint, "precision": job.precision,
        "device": device, "darkroom_version": __version__,
    }
    if job.prior_steps is not None:  # Wuerstchen: the prior's stage
        meta.update(prior_steps=job.prior_steps, prior_guidance=job.prior_guidance)
    if job.control_image is not None:  # ControlNet: which control image, annotated how, weighted how
        meta.update(control_image=job.control_image.rsplit("/", 1)[-1], annotator=job.annotator or "none",
                    controlnet_scale=job.controlnet_scale)
    return meta


def _record(runtime: WorkerRuntime, result: ItemResult) -> GenerateOutcome:
    """Count the item in Redis; whoever finishes the batch writes its manifest (idempotently).

    A duplicate that changed nothing (a redelivery of a done item, a cancelled batch's queued item the producer
    already recorded) rewrites no manifest that already covers the batch: a thousand such items then drain in
    milliseconds each. A manifest write that failed (a storage outage) is still retried: its mark stays short."""
    counts = runtime.progress.record(result)
    finished = counts.total > 0 and counts.finished >= counts.total
    if result.status == "done" and counts.changed:  # item.done, if the batch's producer asked for it
        notify_item(runtime.progress, runtime.send_task, result.batch_id, result.index, result.uri, counts)
    if finished and (counts.changed or counts.in_manifest < counts.total):
        write_manifest(runtime.progress, runtime.storage, result.batch_id, send=runtime.send_task)
    return GenerateOutcome(result, finished)


def _identity(payload: object) -> tuple[str | None, int | None, str, int | None]:
    if not isinstance(payload, dict):
        return None, None, "", None
    batch_id, index = payload.get("batch_id"), payload.get("index")
    try:
        batch_id = keys.check_name("batch", batch_id) if isinstance(batch_id, str) else None
    except ValueError:
        batch_id = None
    index = index if isinstance(index, int) and index >= 0 else None
    seed = payload.get("seed") if isinstance(payload.get("seed"), int) else None
    prompt = payload.get("prompt") if isinstance(payload.get("prompt"), str) else ""
    return batch_id, index, prompt, seed
