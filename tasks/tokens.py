"""Prompt length in tokens: the policy a request chooses and the messages both sides report.

A diffusion model's text encoder takes a fixed number of tokens (CLIP: 77, the start and end tokens
included); the tokenizer drops the rest. darkroom never drops them silently: the producer counts with the
artifact's tokenizer (darkroom/tokens.py) and the worker, which always has the tokenizer, enforces the same
policy when the producer could not count (workers/generate/prompt_length.py).
"""

from __future__ import annotations

from typing import Literal

from tasks.errors import InvalidRequest

DEFAULT_MAX_TOKENS = 77
# What to do with a prompt longer than the model's text encoder takes (CLIP: 77 tokens, ends included).
LONG_PROMPT_POLICIES = ("reject", "truncate")
LongPrompts = Literal["reject", "truncate"]


def too_long(count: int, max_length: int) -> str:
    return (f"{count} tokens, more than the {max_length} the model reads (the rest would be dropped); "
            "shorten it, or submit with --long-prompts truncate to accept the cut with a warning")


def truncated(count: int, max_length: int) -> str:
    return f"{count} tokens, truncated to the {max_length} the model reads"


def check_policy(policy: str) -> str:
    if policy not in LONG_PROMPT_POLICIES:
        raise InvalidRequest(f"{policy!r} is not one of {', '.join(LONG_PROMPT_POLICIES)}", field="long_prompts")
    return policy
