"""The worker's side of the long-prompt policy: it always has the model's tokenizer, so it always knows.

A producer that could count the tokens has already refused over-long prompts under `reject`; this is the
check for producers that could not (tasks/tokens.py), and the warning under `truncate`.
"""

from __future__ import annotations

from typing import Any

from tasks.errors import InvalidRequest
from tasks.schemas import GenerateJob
from tasks.tokens import too_long, truncated


def prompt_warnings(pipeline: Any, job: GenerateJob) -> list[str]:
    """Warnings for prompts the text encoder will cut; InvalidRequest under the `reject` policy."""
    tokenizer = getattr(pipeline, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
        return []
    warnings = []
    for field in ("prompt", "negative_prompt"):
        text = getattr(job, field)
        if not text:
            continue
        count = len(tokenizer(text, truncation=False, verbose=False).input_ids)
        if count > limit:
            if job.long_prompts == "reject":
                raise InvalidRequest(too_long(count, limit), field=field)
            warnings.append(f"{field}: {truncated(count, limit)}")
    return warnings
