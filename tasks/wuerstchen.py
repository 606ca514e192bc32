"""Wuerstchen requests on the producer's side: the prior's own fields, the family's defaults, its sizes.

Rules (README "Model families"):
- Wuerstchen renders in two denoising stages. `steps` and `guidance` are the decoder's (stage B);
  `prior_steps` and `prior_guidance` (--prior-steps / --prior-guidance, or per-item columns) are the prior's
  (stage C). Defaults are diffusers' WuerstchenCombinedPipeline's: prior 60 steps at guidance 4.0, decoder 12
  steps at guidance 0.0, and the model's size, 1024x1024.
- Only Wuerstchen models take the prior fields, and they take no `scheduler` (both stages run
  DDPMWuerstchenScheduler, recorded as "ddpm-wuerstchen").
- Width and height are multiples of 128: the prior's 42.67x and the decoder's 10.67x latent scales render exactly
  those sizes (1024 -> 24 -> 256 -> 1024); other sizes would come out another size, so they are refused.
Nothing here imports torch, diffusers or openvino.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from darkroom.prompts import PromptLine
from tasks.errors import InvalidRequest
from tasks.schemas import Limits

FAMILY = "wuerstchen"
SCHEDULER = "ddpm-wuerstchen"
DEFAULT_SIDE = 1024
SIZE_MULTIPLE = 128
PRIOR_FIELDS = ("prior_steps", "prior_guidance")
DEFAULT_STEPS, DEFAULT_GUIDANCE = 12, 0.0
DEFAULT_PRIOR_STEPS, DEFAULT_PRIOR_GUIDANCE = 60, 4.0


def family_defaults(lines: Sequence[PromptLine], *, family: str, model: str, limits: Limits,
                    options: dict[str, Any]) -> dict[str, Any]:
    """The batch-wide defaults a model's family sets (none but the prior's for other families, which are
    refused), after checking every line. `options` are the batch-wide steps, guidance, prior_steps,
    prior_guidance, scheduler, width and height as given (None: not given)."""
    if family != FAMILY:
        for field in PRIOR_FIELDS:
            line = next((pl.line for pl in lines if getattr(pl.item, field) is not None), None)
            if options[field] is not None or line is not None:
                raise InvalidRequest(f"model {model!r} is a {family!r} model; {field} applies to Wuerstchen models "
                                     "only", field=field, line=line)
        return {}
    _check_batch(options, limits)
    for pl in lines:
        item = pl.item
        if item.scheduler is not None:
            raise _no_scheduler(pl.line)
        for field in ("width", "height"):
            value = getattr(item, field) or options[field]
            if value % SIZE_MULTIPLE:
                raise InvalidRequest(_size_problem(value), field=field, line=pl.line)
    return {"steps": options["steps"] or DEFAULT_STEPS,
            "guidance": DEFAULT_GUIDANCE if options["guidance"] is None else options["guidance"],
            "prior_steps": options["prior_steps"] or DEFAULT_PRIOR_STEPS,
            "prior_guidance": (DEFAULT_PRIOR_GUIDANCE if options["prior_guidance"] is None
                               else options["prior_guidance"]),
            "scheduler": SCHEDULER}


def check_prior_limits(prior_steps: int | None, prior_guidance: float | None, limits: Limits,
                       line: int | None = None) -> None:
    """The prior's steps and guidance within the farm's limits for steps and guidance."""
    if prior_steps is not None and prior_steps > limits.max_steps:
        raise InvalidRequest(f"{prior_steps} is more than {limits.max_steps}", field="prior_steps", line=line)
    if prior_guidance is not None and prior_guidance > limits.max_guidance:
        raise InvalidRequest(f"{prior_guidance} is more than {limits.max_guidance}", field="prior_guidance",
                             line=line)


def _check_batch(options: dict[str, Any], limits: Limits) -> None:
    if options["scheduler"] is not None:
        raise _no_scheduler(None)
    check_prior_limits(options["prior_steps"], options["prior_guidance"], limits)
    for field in ("width", "height"):
        if options[field] % SIZE_MULTIPLE:
            raise InvalidRequest(_size_problem(options[field]), field=field)


def _no_scheduler(line: int | None) -> InvalidRequest:
    return InvalidRequest(f"Wuerstchen models run their own scheduler ({SCHEDULER}); leave the scheduler out",
                          field="scheduler", line=line)


def _size_problem(value: int) -> str:
    return (f"{value} is not a multiple of {SIZE_MULTIPLE}: Wuerstchen's stages render multiples of "
            f"{SIZE_MULTIPLE} exactly (its default is {DEFAULT_SIDE})")
