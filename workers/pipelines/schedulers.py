"""Scheduler names a request may use (tasks.names.SCHEDULER_NAMES), mapped to diffusers schedulers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.names import SCHEDULER_NAMES

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

# name -> (diffusers class name, settings that define the name whatever the model's own scheduler says).
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # "DPM++ 2M" is DPM-Solver++ of order 2; a model shipped with another DPM variant must not change that.
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
# name -> settings used where the model's config does not say (it ships another class): these schedulers as SD ships
# them. Without skip_prk_steps, diffusers' PNDM runs Runge-Kutta warm-up steps and fails below 4 steps; DDIM's own
# defaults clip the predicted sample to [-1, 1], which is an image's range, not a latent's (SD's reach about +-4).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "pndm": {"skip_prk_steps": True},
    "ddim": {"clip_sample": False, "set_alpha_to_one": False},
}

# A model folder's scheduler class -> the name requests use: a model's own scheduler is its default.
SCHEDULER_BY_CLASS = {class_name: name for name, (class_name, _) in _SCHEDULERS.items()}


def native_scheduler(model_dir: Path) -> str:
    """The scheduler name of the class a model (diffusers or IR folder) ships; PNDM, SD's own, if unknown."""
    config = json.loads((Path(model_dir) / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return SCHEDULER_BY_CLASS.get(config.get("_class_name", ""), "pndm")


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler `name` built from a model's scheduler config (betas, offsets, prediction type)."""
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULER_NAMES)}")
    import diffusers

    class_name, overrides = _SCHEDULERS[name]
    # from_config ignores keys another scheduler class wrote (e.g. PNDM's skip_prk_steps) instead of failing; the
    # defaults fill what a config of another class lacks.
    return getattr(diffusers, class_name).from_config({**_DEFAULTS.get(name, {}), **config}, **overrides)
