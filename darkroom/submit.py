"""submit(...): validate a prompt batch, then enqueue one generation task per image, by name, as JSON."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from broker.app import make_app
from broker.progress import BatchProgress
from broker.settings import Settings
from darkroom.batches import BatchHandle
from darkroom.prompts import PromptLine, load_prompts, require_prompts
from storage import keys, open_storage
from tasks.errors import InvalidRequest, InvalidRequests
from tasks.models import ModelRef, resolve_model
from tasks.names import GENERATE_TASK, generate_queue
from tasks.schemas import (
    MAX_SEED,
    GenerateJob,
    ItemRequest,
    Limits,
    check_scheduler,
    check_size,
    invalid_from_validation,
)
from tasks.seeds import derive_seed, random_batch_seed
from tasks.tokens import enforce_prompt_length
from tasks.wuerstchen import PRIOR_FIELDS, family_defaults

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5


def submit(
    prompts: str | Path | Sequence[str | dict[str, Any]],
    *,
    model: str,
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = None,
    negative_prompt: str = "",
    images_per_prompt: int = 1,
    scheduler: str | None = None,
    device: str = "CPU",
    precision: str | None = None,
    batch_id: str | None = None,
    column: str | None = None,
    queue: str | None = None,
    skip_invalid: bool = False,
    settings: Settings | None = None,
    long_prompts: str = "reject",
    control_image: str | Path | None = None,
    annotator: str | None = None,
    controlnet_scale: float | None = None,
    init_image: str | Path | None = None,
    strength: float | None = None,
    watermark: str | None = None,
    prior_steps: int | None = None,
    prior_guidance: float | None = None,
) -> BatchHandle:
    """Validate everything, then enqueue one task per image. Nothing is enqueued if validation fails."""
    settings = settings or Settings.from_env()
    limits = Limits.from_env()
    # 1. Parse and validate the prompts and the batch-wide options.
    parsed = load_prompts(prompts, column=column, limits=limits)
    lines = require_prompts(parsed, skip_invalid=skip_invalid)
    steps, guidance, width, height, seed, negative_prompt, images_per_prompt, prior_steps, prior_guidance = \
        _check_options(steps=steps, guidance=guidance, width=width, height=height, seed=seed,
                       negative_prompt=negative_prompt, images_per_prompt=images_per_prompt, prior_steps=prior_steps,
                       prior_guidance=prior_guidance)
    batch_id = _batch_id(batch_id)
    if scheduler is not None:
        scheduler = _field(check_scheduler, scheduler, "scheduler")
    # 2. Reach the services before doing anything that lasts.
    progress = BatchProgress(settings.broker_url, ttl=settings.progress_ttl)
    progress.ping()
    storage = open_storage(settings.storage_url)
    ref = resolve_model(storage, model, precision)
    # Tokens past the model's limit are reported, never dropped silently (tasks/tokens.py).
    lines, too_long = enforce_prompt_length(lines, negative_prompt, storage, ref, long_prompts,
                                            skip_invalid=skip_invalid)
    # Wuerstchen: the prior's steps and guidance, the family's defaults and sizes (tasks/wuerstchen.py).
    family = family_defaults(lines, family=ref.family, model=ref.name, limits=limits, options={
        "steps": steps, "guidance": guidance, "prior_steps": prior_steps, "prior_guidance": prior_guidance,
        "scheduler": scheduler, "width": width or ref.width, "height": height or ref.height})
    # ControlNet: each item's control image, checked and uploaded once per file (darkroom/control.py).
    from darkroom.control import resolve_controls

    base_dir = Path(prompts).parent if isinstance(prompts, (str, Path)) and Path(prompts).is_file() else None
    controls = resolve_controls(lines, family=ref.family, model=ref.name, storage=storage,
                                control_image=control_image, annotator=annotator, controlnet_scale=controlnet_scale,
                                width=width, height=height, base_dir=base_dir)
    # Image-to-image: each item's init image, checked and uploaded once per file (darkroom/init_images.py).
    from darkroom.init_images import resolve_init_images

    inits = resolve_init_images(lines, family=ref.family, model=ref.name, storage=storage, init_image=init_image,
                                strength=strength, steps=steps or DEFAULT_STEPS, width=width, height=height,
                                base_dir=base_dir)
    for line_number, fields in inits.items():
        controls.setdefault(line_number, {}).update(fields)
    # 3. Expand prompts into jobs: one per image, with deterministic seeds.
    batch_seed = random_batch_seed() if seed is None else _field(_check_seed, seed, "seed")
    defaults = {"steps": steps or DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE if guidance is None else guidance,
                "width": width or ref.width, "height": height or ref.height,
                "scheduler": scheduler or ref.scheduler, "negative_prompt": negative_prompt,
                "images_per_prompt": images_per_prompt, **family}
    jobs = _expand(lines, defaults, ref, batch_id, batch_seed, device, limits, long_prompts, controls)
    if watermark is not None:  # an invisible watermark in every image of the batch (workers/pipelines/watermark.py)
        watermark = _field(_check_watermark, watermark, "watermark")
        small = next((j for j in jobs if j.width * j.height < 256 * 256), None)
        if small is not None:
            raise InvalidRequest(f"an invisible watermark needs images of at least 256x256 pixels; item "
                                 f"{small.index} is {small.width}x{small.height}", field="watermark")
        jobs = [GenerateJob.model_validate({**j.model_dump(), "watermark": watermark}) for j in jobs]
    if len(jobs) > limits.max_items:
        raise InvalidRequest(f"{len(jobs)} images is more than the {limits.max_items} allowed", field="prompts")
    # 4. Record the request (storage) and the batch (Redis) before the first task can finish.
    request = {"batch_id": batch_id, "batch_seed": batch_seed, "model": ref.name, "precision": ref.precision,
               "fingerprint": ref.fingerprint, "created": datetime.now(UTC).isoformat(),
               "total": len(jobs), "items": [j.model_dump() for j in jobs]}
    storage.put_json(keys.batch_request_key(batch_id), request)
    progress.start(batch_id, len(jobs), {"model": ref.name, "fingerprint": ref.fingerprint})
    # 5. Enqueue, skipping items a previous submission of the same batch already finished.
    finished = {i for i, status in progress.status_of(batch_id).items() if status == "done"}
    enqueued = send_jobs(jobs, settings, queue=queue or generate_queue(device), skip=finished)
    invalid = tuple(str(p) for p in (*parsed.problems, *too_long))
    return BatchHandle(batch_id, len(jobs), settings, invalid, enqueued, progress)


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


def _expand(lines: Sequence[PromptLine], defaults: dict[str, Any], ref: ModelRef, batch_id: str,
            batch_seed: int, device: str, limits: Limits, long_prompts: str = "reject",
            controls: dict[int, dict[str, Any]] | None = None) -> list[GenerateJob]:
    jobs: list[GenerateJob] = []
    problems: list[InvalidRequest] = []
    for pl in lines:
        item = pl.item
        control = (controls or {}).get(pl.line, {})
        size = {k: control[k] for k in ("width", "height") if k in control}
        merged = {**defaults, **size, **item.model_dump(exclude_none=True)}
        try:
            _check_merged(merged, item.seed, limits, pl.line)
        except InvalidRequest as exc:  # every bad line is reported, not only the first
            problems.append(exc)
            continue
        for k in range(merged["images_per_prompt"]):
            index = len(jobs)
            # An explicit item seed gives its first image that seed, the next ones seed+1, ...
            seed = item.seed + k if item.seed is not None else derive_seed(batch_seed, index)
            jobs.append(GenerateJob(
                batch_id=batch_id, index=index, prompt=item.prompt, negative_prompt=merged["negative_prompt"] or "",
                seed=seed, steps=merged["steps"], guidance=float(merged["guidance"]), width=merged["width"],
                height=merged["height"], scheduler=merged["scheduler"], model=ref.name, precision=ref.precision,
                fingerprint=ref.fingerprint, family=ref.family, device=device, long_prompts=long_prompts,
                **{k: control[k] for k in ("control_image", "annotator", "controlnet_scale", "init_image",
                                           "strength") if k in control},
                **{k: merged[k] for k in PRIOR_FIELDS if k in merged}))
    if problems:
        raise problems[0] if len(problems) == 1 else InvalidRequests(problems)
    return jobs


def _check_watermark(text: str) -> str:
    from tasks.schemas import MAX_WATERMARK_CHARS

    if not isinstance(text, str) or not text or len(text) > MAX_WATERMARK_CHARS or not text.isprintable():
        raise ValueError(f"{text!r}: give 1-{MAX_WATERMARK_CHARS} printable characters")
    return text


def _check_merged(merged: dict[str, Any], item_seed: int | None, limits: Limits, line: int) -> None:
    check_size(merged["width"], merged["height"], limits, line=line)
    if merged["steps"] > limits.max_steps:
        raise InvalidRequest(f"{merged['steps']} is more than {limits.max_steps}", field="steps", line=line)
    if not 0 <= merged["guidance"] <= limits.max_guidance:
        raise InvalidRequest(f"{merged['guidance']} is outside 0..{limits.max_guidance}", field="guidance",
                             line=line)
    count = merged["images_per_prompt"]
    if not 1 <= count <= limits.max_images_per_prompt:
        raise InvalidRequest(f"{count} is outside 1..{limits.max_images_per_prompt}",
                             field="images_per_prompt", line=line)
    if item_seed is not None and item_seed + count - 1 > MAX_SEED:
        raise InvalidRequest(f"{item_seed} + {count - 1} more images passes the largest seed {MAX_SEED}",
                             field="seed", line=line)


def _check_options(**options: Any) -> tuple[Any, ...]:
    """The batch-wide options, checked by the same field rules as a prompt file's per-item overrides."""
    try:
        item = ItemRequest.model_validate({"prompt": "-", **{k: v for k, v in options.items() if v is not None}})
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None
    values = {k: getattr(item, k) for k in options}
    values["negative_prompt"] = values["negative_prompt"] or ""
    values["images_per_prompt"] = values["images_per_prompt"] or 1
    return tuple(values.values())


def _batch_id(batch_id: str | None) -> str:
    if batch_id is None:
        return datetime.now(UTC).strftime("b%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    return _field(keys.check_name, "batch", batch_id, "batch_id")


def _check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"{seed!r} is not an integer in 0..2**63-1")
    return seed


def _field(check: Callable[..., Any], *args: Any) -> Any:
    """Run a check; a ValueError becomes an InvalidRequest naming the field (the last argument)."""
    *values, name = args
    try:
        return check(*values)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field=name) from None
