"""The Wuerstchen step of a generation job: the prior's fields, checked against the family the artifact has.

The producer refuses prior fields for other families and scheduler names for Wuerstchen (tasks/families.py);
the worker, which knows the family from the artifact's manifest, checks again for jobs built by other means.
"""

from __future__ import annotations

from typing import Any

from tasks.errors import InvalidRequest
from tasks.families import DEFAULT_PRIOR_GUIDANCE, DEFAULT_PRIOR_STEPS, PRIOR_FIELDS
from tasks.families import WUERSTCHEN as FAMILY
from tasks.families import WUERSTCHEN_SCHEDULER as SCHEDULER
from tasks.schemas import GenerateJob


def wuerstchen_inputs(job: GenerateJob, pipeline: Any) -> dict[str, Any]:
    """The keyword arguments a Wuerstchen pipeline's generate() takes for this job (none for other families)."""
    family = getattr(pipeline, "family", "sd")
    if family != FAMILY:
        for field in PRIOR_FIELDS:
            if getattr(job, field) is not None:
                raise InvalidRequest(f"model {job.model!r} is a {family!r} model; {field} applies to Wuerstchen "
                                     "models only", field=field)
        return {}
    if job.scheduler != SCHEDULER:
        raise InvalidRequest(f"Wuerstchen models run their own scheduler ({SCHEDULER}), not {job.scheduler!r}",
                             field="scheduler")
    return {"prior_steps": job.prior_steps or DEFAULT_PRIOR_STEPS,
            "prior_guidance": DEFAULT_PRIOR_GUIDANCE if job.prior_guidance is None else job.prior_guidance}
