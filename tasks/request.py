"""The one request object: a generation batch as the CLI, the Python API and the HTTP API all build it.

A `GenerationRequest` holds the prompts (a file, a dataset, or the items themselves) and the batch-wide options;
None means "not set", so the defaults apply in one order (tasks/families.py): common, family, the model's
manifest, this request, the item's own line. `resolve_item` applies that order; `check_limits` holds the farm's
configurable limits; the family's `check_request` its rules. The producer (darkroom/submit.py) turns a resolved
item into `GenerateJob`s.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from storage import keys
from tasks.errors import InvalidRequest
from tasks.families import COMMON_DEFAULTS, PRIOR_FIELDS, Family
from tasks.names import BATCH_WEBHOOK_EVENTS, DEFAULT_DEVICE, DEFAULT_PRIORITY, WEBHOOK_EVENTS
from tasks.schemas import (
    MAX_SEED,
    AnnotatorName,
    ControlnetScale,
    Guidance,
    ImagesPerPrompt,
    ItemRequest,
    Limits,
    PromptText,
    SchedulerName,
    Seed,
    Side,
    Steps,
    Strength,
    WatermarkText,
    check_size,
    invalid_from_validation,
)
from tasks.tokens import LONG_PROMPT_POLICIES, LongPrompts

Priority = Literal["high", "normal", "low"]

# The fields an item of a prompt file may set for itself; the rest of a request is batch-wide only.
ITEM_FIELDS: tuple[str, ...] = tuple(f for f in ItemRequest.model_fields if f != "prompt")
Prompts = str | Path | list[str | dict[str, Any]] | tuple[str | dict[str, Any], ...]


class GenerationRequest(BaseModel):
    """A generation batch: what to render (model, prompts) and how (batch-wide options, None: the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1)
    # A prompt file (.txt, .jsonl, .csv), a `datasets` folder/file/name, or the items themselves (str or dict).
    prompts: Prompts
    column: str | None = None  # the prompt column of a CSV or dataset
    # The batch seed: item seeds derive from it and the item's index (random when None).
    seed: Seed | None = None
    steps: Steps | None = None
    guidance: Guidance | None = None
    width: Side | None = None
    height: Side | None = None
    negative_prompt: PromptText | None = None
    images_per_prompt: ImagesPerPrompt | None = None
    scheduler: SchedulerName | None = None
    # ControlNet models: the control image of every item (a control_image column overrides it per item).
    control_image: str | Path | None = None
    annotator: AnnotatorName | None = None
    controlnet_scale: ControlnetScale | None = None
    # SD 1.x image-to-image: the image every item starts from, and how much to redraw.
    init_image: str | Path | None = None
    strength: Strength | None = None
    # Wuerstchen models: the prior's steps and guidance (steps and guidance are the decoder's).
    prior_steps: Steps | None = None
    prior_guidance: Guidance | None = None
    watermark: WatermarkText | None = None
    long_prompts: LongPrompts = LONG_PROMPT_POLICIES[0]
    # Its queue among the device's: high before normal before low, each worker taking the next image in that order.
    priority: Priority = DEFAULT_PRIORITY
    # Routing: the device whose queue takes the batch (or an explicit queue), and the artifact to use.
    device: str = DEFAULT_DEVICE
    precision: str | None = None
    queue: str | None = None
    # Naming the batch makes a resubmission enqueue only its unfinished items.
    batch_id: str | None = None
    skip_invalid: bool = False
    # Where the batch's events are POSTed (http/https; the host is checked at submit and at each delivery; None:
    # the producer's DARKROOM_WEBHOOK_URL, if set), and which events: default the three batch ones.
    webhook: str | None = None
    webhook_events: tuple[str, ...] = BATCH_WEBHOOK_EVENTS

    @field_validator("negative_prompt", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        # Stripped as a prompt file's cells are; names (model, batch_id) are not: a name with spaces is refused.
        return value.strip() if isinstance(value, str) else value

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _events(cls, value: Any) -> Any:
        names = [e.strip() for e in value.split(",") if e.strip()] if isinstance(value, str) else value
        unknown = [e for e in names or () if e not in WEBHOOK_EVENTS]
        if unknown or not names:
            raise ValueError(f"unknown event(s) {', '.join(map(str, unknown)) or '(none)'}; choose among "
                             f"{', '.join(WEBHOOK_EVENTS)}")
        return tuple(dict.fromkeys(names))

    @field_validator("webhook")
    @classmethod
    def _webhook_scheme(cls, value: str | None) -> str | None:
        # The scheme here (no network needed); the host's addresses at submit (broker/webhooks.py check_url).
        if value is not None and not value.lower().startswith(("http://", "https://")):
            raise ValueError("only http:// and https:// URLs are allowed")
        return value

    @field_validator("batch_id")
    @classmethod
    def _batch_name(cls, value: str | None) -> str | None:
        return None if value is None else keys.check_name("batch", value)

    @classmethod
    def build(cls, prompts: GenerationRequest | Prompts, **overrides: Any) -> GenerationRequest:
        """A request from another one (with `overrides` applied) or from prompts and options; InvalidRequest
        naming the field when a value is wrong."""
        base = prompts.model_dump() if isinstance(prompts, GenerationRequest) else {"prompts": prompts}
        try:
            return cls.model_validate({**base, **overrides})
        except ValidationError as exc:
            raise invalid_from_validation(exc) from None

    def given(self, item: ItemRequest | None = None) -> dict[str, Any]:
        """The item fields as this request and `item`'s line set them (the item wins), before any default."""
        # The request's seed is the batch seed, from which item seeds derive: only an item's own seed is one.
        values = {f: getattr(self, f) for f in ITEM_FIELDS if f != "seed"}
        if item is not None:
            values.update(item.model_dump(exclude_none=True, exclude={"prompt"}))
        return values


def resolve_item(request: GenerationRequest, item: ItemRequest, family: Family,
                 manifest_defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of one item with the defaults applied: common, family, the model's manifest, request, item."""
    values = {**COMMON_DEFAULTS, **family.defaults, **manifest_defaults}
    values.update({k: v for k, v in request.given(item).items() if v is not None})
    if not family.takes.intersection(PRIOR_FIELDS):
        for name in PRIOR_FIELDS:  # None on the wire for families without a prior
            values.pop(name, None)
    values["prompt"] = item.prompt
    return values


def check_limits(values: Mapping[str, Any], limits: Limits, *, line: int | None = None, sized: bool = False) -> None:
    """The farm's configurable limits on whatever of these fields is set. `sized`: the values are resolved, so
    the size rule (multiples of 8, the side and pixel limits) and the seed range of the item's images apply."""
    prompt = values.get("prompt")
    if prompt is not None and len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest(f"longer than {limits.max_prompt_chars} characters", field="prompt", line=line)
    for name in ("steps", "prior_steps"):
        if (value := values.get(name)) is not None and value > limits.max_steps:
            raise InvalidRequest(f"{value} is more than {limits.max_steps}", field=name, line=line)
    for name in ("guidance", "prior_guidance"):
        if (value := values.get(name)) is not None and value > limits.max_guidance:
            raise InvalidRequest(f"{value} is more than {limits.max_guidance}", field=name, line=line)
    count = values.get("images_per_prompt")
    if count is not None and count > limits.max_images_per_prompt:
        raise InvalidRequest(f"{count} is more than {limits.max_images_per_prompt}", field="images_per_prompt",
                             line=line)
    if not sized:
        return
    check_size(values["width"], values["height"], limits, line=line)
    seed = values.get("seed")
    if seed is not None and seed + values["images_per_prompt"] - 1 > MAX_SEED:
        raise InvalidRequest(f"{seed} + {values['images_per_prompt'] - 1} more images passes the largest seed "
                             f"{MAX_SEED}", field="seed", line=line)

