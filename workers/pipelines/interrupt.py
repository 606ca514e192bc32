"""Stopping a render between denoising steps: the pipelines call `check` once per step with the caller's
`should_stop` (a cheap callable: the generation job's asks Redis whether the batch was cancelled)."""

from __future__ import annotations

from collections.abc import Callable

ShouldStop = Callable[[], bool] | None


class Interrupted(Exception):
    """The caller asked the render to stop; nothing of it was returned or written."""


def check(should_stop: ShouldStop) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted()
