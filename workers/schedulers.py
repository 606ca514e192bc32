"""Scheduler names a request may use (tasks.names.SCHEDULER_NAMES), mapped to diffusers schedulers."""

from __future__ import annotations

from collections.abc import Mapping
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


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler `name` built from a model's scheduler config (betas, offsets, prediction type)."""
    if name not in _SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULER_NAMES)}")
    import diffusers

    class_name, overrides = _SCHEDULERS[name]
    # from_config ignores keys another scheduler class wrote (e.g. PNDM's skip_prk_steps) instead of failing.
    return getattr(diffusers, class_name).from_config(dict(config), **overrides)
