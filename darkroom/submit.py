"""submit(...): validate a generation request, then enqueue one generation task per image, by name, as JSON."""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from broker.app import make_app
from broker.progress import BatchProgress
from broker.reopen import reopen_failed, restore_failed
from broker.settings import Settings
from broker.webhooks import WEBHOOK_URL_ENV, WebhookRefused, check_url
from darkroom.batches import BatchHandle
from darkroom.control import resolve_controls
from darkroom.init_images import resolve_init_images
from darkroom.prompts import PromptLine, load_prompts, require_prompts
from darkroom.tokens import enforce_prompt_length
from storage import Storage, keys, open_storage
from tasks.errors import InvalidRequest, InvalidRequests
from tasks.families import Family, family_rules
from tasks.models import ModelRef, resolve_model
from tasks.names import GENERATE_TASK, generate_queue, priority_queue
from tasks.request import GenerationRequest, Prompts, check_limits, resolve_item
from tasks.schemas import GenerateJob, Limits
from tasks.seeds import derive_seed, random_batch_seed

# An invisible watermark needs room for its bits (workers/pipelines/watermark.py).
MIN_WATERMARK_PIXELS = 256 * 256


@dataclass(frozen=True)
class BatchPlan:
    """What every job of one batch shares: its request, its pinned artifact and family, its id and seed."""

    request: GenerationRequest
    ref: ModelRef
    family: Family
    batch_id: str
    batch_seed: int


def submit(request: GenerationRequest | Prompts, /, *, settings: Settings | None = None,
           **overrides: Any) -> BatchHandle:
    """Validate everything, then enqueue one task per image. Nothing is enqueued if validation fails.

    `request`: a GenerationRequest, or the prompts (a file path, a dataset, or a list of prompts or dicts) with
    the request's fields as keyword arguments, e.g. `submit(["a cat"], model="sd15", steps=20)`.
    """
    # 1. One request object, whatever the caller gave; the farm's limits on its batch-wide options.
    request = GenerationRequest.build(request, **overrides)
    settings = settings or Settings.from_env()
    limits = Limits.from_env()
    check_limits(request.given(), limits)
    webhook = request.webhook or os.environ.get(WEBHOOK_URL_ENV) or None
    if webhook is not None:
        try:
            check_url(webhook)  # no POSTs to cloud metadata (SSRF); checked again at each delivery
        except WebhookRefused as exc:
            raise InvalidRequest(str(exc), field="webhook") from None
    # 2. Parse the prompts: every line checked against the schema and the limits.
    parsed = load_prompts(request.prompts, column=request.column, limits=limits)
    lines = require_prompts(parsed, skip_invalid=request.skip_invalid)
    # 3. Reach the services before doing anything that lasts; pin the model's artifact.
    progress = BatchProgress(settings.broker_url, ttl=settings.progress_ttl)
    progress.ping()
    storage = open_storage(settings.storage_url)
    ref = resolve_model(storage, request.model, request.precision)
    # 4. Tokens past the model's limit are reported, never dropped silently (darkroom/tokens.py).
    lines, too_long = enforce_prompt_length(lines, request.negative_prompt or "", storage, ref,
                                            request.long_prompts, skip_invalid=request.skip_invalid)
    # 5. The family's rules, for the batch and for every line; then the items' images, uploaded once per file.
    family = family_rules(ref.family)
    family.check_request(request.given(), model=ref.name)
    for pl in lines:
        family.check_request(request.given(pl.item), model=ref.name, line=pl.line)
    images = _item_images(lines, request, family, storage)
    # 6. Expand prompts into jobs: one per image, with deterministic seeds.
    batch_seed = random_batch_seed() if request.seed is None else request.seed
    plan = BatchPlan(request, ref, family, request.batch_id or _new_batch_id(), batch_seed)
    jobs = expand_jobs(plan, lines, images, limits)
    # 7. Record the request (storage: `darkroom retry` sends its jobs again, to its queue) and the batch (Redis)
    #    before the first task can finish.
    queue = request.queue or generate_queue(request.device)
    record = {"batch_id": plan.batch_id, "batch_seed": batch_seed, "model": ref.name, "precision": ref.precision,
              "fingerprint": ref.fingerprint, "created": datetime.now(UTC).isoformat(), "queue": queue,
              "priority": request.priority, "webhook": webhook,
              "webhook_events": list(request.webhook_events),
              "total": len(jobs), "items": [j.model_dump() for j in jobs]}
    storage.put_json(keys.batch_request_key(plan.batch_id), record)
    # The webhook and the queue in Redis too: the worker that finishes the batch sends the event without reading
    # storage, to the batch's own queue.
    progress.start(plan.batch_id, len(jobs), {"model": ref.name, "fingerprint": ref.fingerprint, "queue": queue,
                                              "webhook": webhook,
                                              "webhook_events": list(request.webhook_events)})
    # 8. Enqueue, skipping items a previous submission of the same batch already finished. Its failed items are
    #    sent again, so they first count as unfinished again: wait() then waits for their new attempts.
    reopened = reopen_failed(progress, plan.batch_id, require_finished=False)
    finished = {i for i, status in progress.status_of(plan.batch_id).items() if status == "done"}
    try:
        enqueued = send_jobs(jobs, settings, queue=priority_queue(queue, request.priority), skip=finished)
    except BaseException:
        restore_failed(progress, reopened)  # their old outcome stands until they are really sent again
        raise
    invalid = tuple(str(p) for p in (*parsed.problems, *too_long))
    return BatchHandle(plan.batch_id, len(jobs), settings, invalid, enqueued, progress)


def expand_jobs(plan: BatchPlan, lines: Sequence[PromptLine], images: dict[int, dict[str, Any]],
                limits: Limits) -> list[GenerateJob]:
    """One GenerateJob per image of every line, its fields resolved in the one default order; every bad line is
    reported, not only the first."""
    request, ref = plan.request, plan.ref
    manifest = {"width": ref.width, "height": ref.height, "scheduler": ref.scheduler}
    jobs: list[GenerateJob] = []
    problems: list[InvalidRequest] = []
    for pl in lines:
        values = {**resolve_item(request, pl.item, plan.family, manifest), **images.get(pl.line, {})}
        try:
            check_limits(values, limits, line=pl.line, sized=True)
        except InvalidRequest as exc:
            problems.append(exc)
            continue
        for k in range(values["images_per_prompt"]):
            index = len(jobs)
            # An explicit item seed gives its first image that seed, the next ones seed+1, ...
            seed = pl.item.seed + k if pl.item.seed is not None else derive_seed(plan.batch_seed, index)
            jobs.append(_job(plan, values, index, seed))
    if problems:
        raise problems[0] if len(problems) == 1 else InvalidRequests(problems)
    if request.watermark is not None:
        small = next((j for j in jobs if j.width * j.height < MIN_WATERMARK_PIXELS), None)
        if small is not None:
            raise InvalidRequest(f"an invisible watermark needs images of at least 256x256 pixels; item "
                                 f"{small.index} is {small.width}x{small.height}", field="watermark")
    if len(jobs) > limits.max_items:
        raise InvalidRequest(f"{len(jobs)} images is more than the {limits.max_items} allowed", field="prompts")
    return jobs


def _job(plan: BatchPlan, values: dict[str, Any], index: int, seed: int) -> GenerateJob:
    fields = {k: v for k, v in values.items() if k in GenerateJob.model_fields and k not in ("seed", "prompt")}
    return GenerateJob(
        **fields, batch_id=plan.batch_id, index=index, prompt=values["prompt"], seed=seed,
        model=plan.ref.name, precision=plan.ref.precision, fingerprint=plan.ref.fingerprint, family=plan.ref.family,
        device=plan.request.device, long_prompts=plan.request.long_prompts, watermark=plan.request.watermark)


def _item_images(lines: Sequence[PromptLine], request: GenerationRequest, family: Family,
                 storage: Storage) -> dict[int, dict[str, Any]]:
    """Per line, the URI and size of its control or init image, checked and uploaded once per distinct file."""
    prompts = request.prompts
    base_dir = Path(prompts).parent if isinstance(prompts, (str, Path)) and Path(prompts).is_file() else None
    if family.needs_control_image:
        return resolve_controls(lines, request, storage, base_dir)
    if "init_image" in family.takes:
        return resolve_init_images(lines, request, storage, base_dir)
    return {}


def send_jobs(jobs: Sequence[GenerateJob], settings: Settings, *, queue: str, skip: set[int] | None = None) -> int:
    """Enqueue generation jobs by task name; task ids are deterministic (batch.index)."""
    app = make_app(settings)
    sent = 0
    with app.producer_or_acquire() as producer:
        for job in jobs:
            if skip and job.index in skip:
                continue
            app.send_task(GENERATE_TASK, kwargs={"job": job.model_dump()}, queue=queue,
                          task_id=f"{job.batch_id}.{job.index}", producer=producer)
            sent += 1
    return sent


def _new_batch_id() -> str:
    return datetime.now(UTC).strftime("b%Y%m%d-%H%M%S-") + secrets.token_hex(3)
