"""Request and result schemas: what travels on the wire, as JSON, between producers and workers."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from tasks.errors import InvalidRequest
from tasks.names import ANNOTATORS, CALIBRATION_MODES, DEFAULT_DEVICE, FAMILIES, SCHEDULER_NAMES
from tasks.tokens import LONG_PROMPT_POLICIES, LongPrompts

MAX_SEED = 2**63 - 1
# An invisible watermark carries its text as bits in the image: short texts only (workers/pipelines/watermark.py).
MAX_WATERMARK_CHARS = 32
MAX_CONTROLNET_SCALE = 5.0
# Defaults a job falls back to when its request leaves them out (tasks/families.py has the rest).
DEFAULT_CONTROLNET_SCALE = 1.0
DEFAULT_STRENGTH = 0.8


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; configurable by environment so a farm can tighten or relax them."""

    max_steps: int = 150
    max_pixels: int = 2048 * 2048
    max_side: int = 4096
    max_items: int = 100_000
    max_images_per_prompt: int = 16
    max_prompt_chars: int = 4000
    max_guidance: float = 50.0

    @classmethod
    def from_env(cls) -> Limits:
        def number(name: str, default: float) -> Any:
            raw = os.environ.get(f"DARKROOM_{name.upper()}")
            return type(default)(raw) if raw else default

        return cls(**{f: number(f, getattr(cls, f)) for f in cls.__dataclass_fields__})


# --- Field types: each field's type and range, defined once and shared by the request, an item of a prompt
# file and the job a worker receives. The farm's configurable limits (Limits) are checked by check_limits.

def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # JSON true is not 1 step
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


def _unicode_text(value: str) -> str:
    # A JSONL "\ud800" escape decodes to a lone surrogate: not text, and not storable as UTF-8.
    if not value.isprintable():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"not valid Unicode text (a lone surrogate at character {exc.start + 1})") from None
    return value


def _controlnet_scale(value: float) -> float:
    if not 0.0 <= value <= MAX_CONTROLNET_SCALE:  # NaN fails too
        raise ValueError(f"{value} is outside 0..{MAX_CONTROLNET_SCALE}")
    return value


def _strength(value: float) -> float:
    if not 0.0 < value <= 1.0:  # NaN fails too
        raise ValueError(f"{value} is outside (0, 1]")
    return value


def check_annotator(name: str) -> str:
    normalized = name.strip().lower()
    if normalized not in ANNOTATORS:
        raise ValueError(f"unknown annotator {name!r}; choose one of {', '.join(ANNOTATORS)}")
    return normalized


def check_scheduler(name: str) -> str:
    normalized = name.strip().lower()
    if normalized not in SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    return normalized


def check_watermark(text: str) -> str:
    if not text or len(text) > MAX_WATERMARK_CHARS or not text.isprintable():
        raise ValueError(f"{text!r}: give 1-{MAX_WATERMARK_CHARS} printable characters")
    return text


Seed = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=MAX_SEED)]
Steps = Annotated[int, BeforeValidator(_not_bool), Field(ge=1)]
Guidance = Annotated[float, BeforeValidator(_not_bool), Field(ge=0.0), AfterValidator(_finite)]
Side = Annotated[int, BeforeValidator(_not_bool), Field(ge=8)]
ImagesPerPrompt = Annotated[int, BeforeValidator(_not_bool), Field(ge=1)]
ControlnetScale = Annotated[float, BeforeValidator(_not_bool), AfterValidator(_controlnet_scale)]
Strength = Annotated[float, BeforeValidator(_not_bool), AfterValidator(_strength)]
PromptText = Annotated[str, AfterValidator(_unicode_text)]
SchedulerName = Annotated[str, AfterValidator(check_scheduler)]
AnnotatorName = Annotated[str, AfterValidator(check_annotator)]
WatermarkText = Annotated[str, AfterValidator(check_watermark)]


class ItemRequest(BaseModel):
    """One prompt as a user writes it: a line of a prompt file, with optional per-item overrides.

    None means "not set here": the batch's request, then the model's and its family's defaults apply.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    prompt: PromptText
    negative_prompt: PromptText | None = None
    seed: Seed | None = None
    steps: Steps | None = None
    guidance: Guidance | None = None
    width: Side | None = None
    height: Side | None = None
    scheduler: SchedulerName | None = None
    images_per_prompt: ImagesPerPrompt | None = None
    # ControlNet models: a local image file (relative to the prompts file's folder), its annotator, its weight.
    control_image: str | None = None
    annotator: AnnotatorName | None = None
    controlnet_scale: ControlnetScale | None = None
    # Image-to-image (SD 1.x): a local image file (relative to the prompts file's folder) and how much to change it.
    init_image: str | None = None
    strength: Strength | None = None
    # Wuerstchen models: the prior's (stage C) steps and guidance; steps and guidance are the decoder's.
    prior_steps: Steps | None = None
    prior_guidance: Guidance | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("the prompt is empty")
        return value


class GenerateJob(BaseModel):
    """One image to render: the message body of a generation task. Everything is resolved already."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str
    index: int = Field(ge=0)
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    seed: Seed
    steps: Steps
    guidance: Guidance
    width: Side
    height: Side
    scheduler: str
    model: str
    precision: str
    fingerprint: str
    family: Literal[FAMILIES] = "sd"  # type: ignore[valid-type]
    device: str = DEFAULT_DEVICE
    long_prompts: LongPrompts = LONG_PROMPT_POLICIES[0]
    # ControlNet: the control image's URI in storage (controls/<sha256>.png), the annotator the worker runs on it
    # first (None: the image is the control image itself), and the residuals' weight.
    control_image: str | None = None
    annotator: str | None = None
    controlnet_scale: ControlnetScale = DEFAULT_CONTROLNET_SCALE
    # Image-to-image: the init image's URI in storage (inputs/<sha256>.png) and the strength in (0, 1].
    init_image: str | None = None
    strength: Strength = DEFAULT_STRENGTH
    # Wuerstchen: the prior's steps and guidance (set by the producer for that family only; None elsewhere).
    prior_steps: Steps | None = None
    prior_guidance: Guidance | None = None
    # An invisible watermark (the invisible-watermark package) embedded in the output; None: none asked for.
    watermark: WatermarkText | None = None


class ConvertJob(BaseModel):
    """Convert a diffusers model (local folder or Hugging Face id) to OpenVINO IR in storage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str = Field(min_length=1)
    weight_format: Literal["fp16", "fp32"] = "fp16"
    make_default: bool = True
    # None: detected from the source's model_index.json; a given family must match it (workers/pipelines/families.py).
    family: Literal[FAMILIES] | None = None  # type: ignore[valid-type]


class Gates(BaseModel):
    """What an INT8 artifact must show, measured against its float base, to become the model's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_speedup: float = Field(default_factory=lambda: float(os.environ.get("DARKROOM_GATE_MIN_SPEEDUP", 1.2)),
                               ge=0.0, allow_inf_nan=False)
    min_psnr_db: float = Field(default_factory=lambda: float(os.environ.get("DARKROOM_GATE_MIN_PSNR", 25.0)),
                               ge=0.0, allow_inf_nan=False)
    # Models that ship a prompt-adherence scorer (the demo model): INT8 may score at most this many points
    # (percent of the fixed prompt/seed set) below FP32.
    max_adherence_drop: float = Field(
        default_factory=lambda: float(os.environ.get("DARKROOM_GATE_MAX_ADHERENCE_DROP", 2.0)), ge=0.0,
        allow_inf_nan=False)


class CalibrateJob(BaseModel):
    """Calibrate a model's float artifact to INT8 on a calibration dataset, measure it, maybe promote it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    dataset: str | None = None
    subset_size: int = Field(default=16, ge=1, le=10_000)
    mode: Literal[CALIBRATION_MODES] = "int8"  # type: ignore[valid-type]
    steps: int = Field(default=10, ge=1, le=150)
    gates: Gates = Field(default_factory=Gates)
    promote: bool = True
    force: bool = False
    origin: str = "manual"


class ItemResult(BaseModel):
    """What a worker reports for one item; also one entry of a batch manifest."""

    model_config = ConfigDict(extra="ignore")

    batch_id: str
    index: int
    status: Literal["done", "failed", "cancelled"]
    prompt: str = ""
    seed: int | None = None
    uri: str | None = None
    error: str | None = None
    worker: str | None = None
    seconds: float | None = None
    attempts: int = 1
    warnings: list[str] = Field(default_factory=list)


def check_size(width: int, height: int, limits: Limits, *, line: int | None = None) -> None:
    """Sizes are multiples of 8 (the VAE's downsampling) and within the farm's pixel limit."""
    for field, value in (("width", width), ("height", height)):
        if value % 8:
            raise InvalidRequest(f"{value} is not a multiple of 8", field=field, line=line)
        if not 8 <= value <= limits.max_side:
            raise InvalidRequest(f"{value} is outside 8..{limits.max_side}", field=field, line=line)
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"{width}x{height} has more than the {limits.max_pixels} pixels allowed",
            field="width", line=line,
        )


def invalid_from_validation(exc: ValidationError, *, line: int | None = None) -> InvalidRequest:
    """The first problem pydantic found, as an InvalidRequest naming the field."""
    problems = [
        InvalidRequest(err["msg"].removeprefix("Value error, "), line=line,
                       field=".".join(str(p) for p in err["loc"]) or None)
        for err in exc.errors()
    ]
    return problems[0] if len(problems) == 1 else _join(problems, line)


def _join(problems: list[InvalidRequest], line: int | None) -> InvalidRequest:
    detail = "; ".join(f"{p.field}: {p.reason}" if p.field else p.reason for p in problems)
    return InvalidRequest(detail, line=line)
