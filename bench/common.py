"""What bench/runners.py (project venv) and bench/peers_runner.py (peers' venv) share: the timing loop and the
protocol by which bench/peers.py calls them. Standard library only, so that both venvs import it.

Protocol: `python RUNNER_SCRIPT NAME PARAMS_JSON OUT_JSON`; the runner writes its result as JSON to OUT_JSON.
Each call is its own process, so its peak memory (the parent's os.wait4) is that runner's alone.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 4k"
NEGATIVE = ""  # the unconditional half of classifier-free guidance: the empty prompt, as in diffusers
GUIDANCE = 7.5
Params = dict[str, Any]
Result = dict[str, Any]


class StepTimer:
    """Wall time of every UNet call, appended by `wrap`ped callables (one call = one step at batch 2)."""

    def __init__(self) -> None:
        self.ms: list[float] = []

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms.append((time.perf_counter() - started) * 1000)

        return timed


def measure(generate: Callable[[int, int], Any], timer: StepTimer | None, params: Params,
            say: Callable[[str], None] | None = None) -> Result:
    """Warm-up images (params["warmup_steps"] steps each), then params["runs"] timed images at params["steps"].

    `generate(seed, steps)` renders one image. Returns per-image seconds and per-UNet-call milliseconds.
    """
    for i in range(params["warmup"]):
        generate(1000 + i, params["warmup_steps"])
    if timer is not None:
        timer.ms.clear()
    image_s: list[float] = []
    for i in range(params["runs"]):
        started = time.perf_counter()
        generate(i, params["steps"])
        image_s.append(time.perf_counter() - started)
        if say:
            say(f"image {i + 1}/{params['runs']}: {image_s[-1]:.2f} s")
    return summarize(image_s, timer.ms if timer else [])


def summarize(image_s: list[float], unet_ms: list[float]) -> Result:
    result: Result = {"image_s": [round(s, 3) for s in image_s], "image_median_s": round(statistics.median(image_s), 3)}
    if unet_ms:
        result.update(unet_median_ms=round(statistics.median(unet_ms), 1), unet_min_ms=round(min(unet_ms), 1),
                      unet_calls=len(unet_ms))
    return result


def self_peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)


def runner_main(runners: dict[str, Callable[[Params], Result]]) -> int:
    """Entry point of a runner script: NAME PARAMS_JSON OUT_JSON."""
    name, params, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"    [{name} {time.perf_counter() - started:5.0f}s] {message}", flush=True)

    params["say"] = say
    result = runners[name](params)
    result.setdefault("self_peak_rss_gb", self_peak_gb())
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0
