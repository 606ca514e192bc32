"""Prompt length in tokens, counted by the producer with the model's own tokenizer read from storage.

A diffusion model's text encoder takes a fixed number of tokens (CLIP: 77, the start and end tokens
included); the tokenizer drops the rest. darkroom never drops them silently:

- the producer counts with the `tokenizer/tokenizer.json` of the pinned artifact (the `tokenizers`
  package, no torch) and, under the default policy `reject`, refuses the batch naming the line and field;
- under `truncate` the batch is accepted and the worker records a warning in the item's result;
- when the producer cannot count (no `tokenizers` package, an artifact without `tokenizer.json`) the
  worker, which always has the tokenizer, enforces the same policy (workers/generate/prompt_length.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from darkroom.prompts import PromptLine
from storage import ObjectNotFound, keys
from storage.base import Storage
from tasks.errors import InvalidRequest, InvalidRequests
from tasks.models import ModelRef
from tasks.tokens import DEFAULT_MAX_TOKENS, check_policy, too_long


@dataclass(frozen=True)
class TokenCounter:
    tokenizer: Any  # tokenizers.Tokenizer
    max_length: int

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text).ids)


def load_counter(storage: Storage, ref: ModelRef) -> TokenCounter | None:
    """The artifact's tokenizer, or None when this producer cannot count (the worker will)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    # The tokenizer's files where optimum-intel's folder layout puts them inside the artifact.
    tokenizer_key, config_key = (keys.artifact_file_key(ref.name, ref.precision, ref.fingerprint, f"tokenizer/{file}")
                                 for file in ("tokenizer.json", "tokenizer_config.json"))
    try:
        tokenizer = Tokenizer.from_str(storage.get_bytes(tokenizer_key).decode("utf-8"))
    except Exception:  # missing, not UTF-8, or not a tokenizer: this producer cannot count
        return None
    try:
        config = storage.get_json(config_key)
        max_length = int(config.get("model_max_length", DEFAULT_MAX_TOKENS))
    except (ObjectNotFound, ValueError, TypeError):
        max_length = DEFAULT_MAX_TOKENS
    if not 1 <= max_length <= 100_000:  # transformers' "no limit" sentinel is a huge number
        max_length = DEFAULT_MAX_TOKENS
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return TokenCounter(tokenizer, max_length)


def long_prompt_problems(lines: Sequence[PromptLine], negative_prompt: str,
                         counter: TokenCounter) -> list[InvalidRequest]:
    """Every prompt (and negative prompt) longer than the model reads, naming its line and field."""
    problems: list[InvalidRequest] = []
    if negative_prompt and (n := counter.count(negative_prompt)) > counter.max_length:
        problems.append(InvalidRequest(too_long(n, counter.max_length), field="negative_prompt"))
    for pl in lines:
        for field in ("prompt", "negative_prompt"):
            text = getattr(pl.item, field)
            if text and (n := counter.count(text)) > counter.max_length:
                problems.append(InvalidRequest(too_long(n, counter.max_length), field=field, line=pl.line))
    return problems


def enforce_prompt_length(lines: Sequence[PromptLine], negative_prompt: str, storage: Storage, ref: ModelRef,
                          policy: str, *, skip_invalid: bool) -> tuple[tuple[PromptLine, ...], list[InvalidRequest]]:
    """The lines to enqueue and the too-long ones skipped; raises when any is too long (unless skip_invalid)."""
    if check_policy(policy) != "reject" or (counter := load_counter(storage, ref)) is None:
        return tuple(lines), []
    problems = long_prompt_problems(lines, negative_prompt, counter)
    bad = {p.line for p in problems}
    kept = tuple(pl for pl in lines if pl.line not in bad)
    if problems and (not skip_invalid or None in bad or not kept):
        raise problems[0] if len(problems) == 1 else InvalidRequests(problems)
    return kept, problems
