"""Device pinning: one worker per OpenVINO device, with the compile settings that device gets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class UnknownDevice(ValueError):
    """The device named is not one OpenVINO sees on this machine."""


def check_device(device: str, available: list[str]) -> str:
    """`device` if OpenVINO lists it (GPU is GPU.0 when only one GPU exists), else a clear error."""
    if device in available:
        return device
    # OpenVINO lists a lone GPU as "GPU"; accept GPU.0 for it and the reverse.
    aliases = {f"{d}.0": d for d in available if "." not in d} | {d.split(".")[0]: d for d in available
                                                                   if d.endswith(".0")}
    if device in aliases:
        return aliases[device]
    raise UnknownDevice(f"device {device!r} is not available here; OpenVINO sees: {', '.join(available) or 'none'}")


class InvalidCores(ValueError):
    """A --cores list that is malformed or names cores this process may not run on."""


def parse_cores(text: str, allowed: set[int] | None = None) -> tuple[int, ...]:
    """`0-3,8,10-11` (the taskset/cpuset syntax) as sorted core ids, each one this process may run on."""
    allowed = os.sched_getaffinity(0) if allowed is None else allowed
    cores: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last if dash else first)
        except ValueError:
            raise InvalidCores(f"--cores: {part.strip()!r} is not a core number or range (e.g. 0-3,8)") from None
        if lo < 0 or hi < lo:
            raise InvalidCores(f"--cores: {part.strip()!r} is not a valid range (e.g. 0-3)")
        cores.update(range(lo, hi + 1))
    outside = sorted(cores - allowed)
    if outside:
        raise InvalidCores(f"--cores: core(s) {', '.join(map(str, outside))} not available here; "
                           f"this machine allows {_ranges(sorted(allowed))}")
    return tuple(sorted(cores))


def pin_to_cores(cores: tuple[int, ...]) -> None:
    """Pin this process, and so every process it forks, to `cores` (OpenVINO sizes its threads to them)."""
    os.sched_setaffinity(0, cores)


def _ranges(cores: list[int]) -> str:
    spans: list[str] = []
    for core in cores:
        if spans and core == int(spans[-1].split("-")[-1]) + 1:
            spans[-1] = f"{spans[-1].split('-')[0]}-{core}"
        else:
            spans.append(str(core))
    return ",".join(spans)


def available_devices(core: Any | None = None) -> list[str]:
    import openvino as ov

    return list((core or ov.Core()).available_devices)


def compile_config(device: str, *, cache_dir: Path, inference_precision: str = "",
                   weightless: bool | None = None) -> dict[str, str]:
    """OpenVINO properties for compiling a model on `device` in a worker.

    The compiled-blob cache makes a restarted worker warm in seconds; LATENCY suits one image at a time.
    On CPU the cache is weightless (CACHE_MODE=OPTIMIZE_SIZE): a blob holds the compiled graph but not the
    weights, which OpenVINO maps from the IR's .bin when it imports the blob (WEIGHTS_PATH, added per model
    by workers.runtime.blob_cache.WeightsPathCore). SD-1.5's UNet blob shrinks from 1.7 GB to 4 MB, so sharing blobs
    through storage costs almost nothing to download. `weightless` defaults to DARKROOM_WEIGHTLESS_CACHE
    (on unless "0"; off gives the full blobs of before, e.g. to compare).
    """
    config = {"CACHE_DIR": str(cache_dir), "PERFORMANCE_HINT": "LATENCY"}
    if weightless is None:
        weightless = os.environ.get("DARKROOM_WEIGHTLESS_CACHE", "1") != "0"
    if weightless and device.split(".")[0] == "CPU":
        config["CACHE_MODE"] = "OPTIMIZE_SIZE"
    # A worker pinned to some cores (--cores, taskset, a cpuset) uses exactly those: OpenVINO's CPU plugin
    # otherwise sizes its thread pool to the whole machine and the workers sharing it oversubscribe.
    pinned = len(os.sched_getaffinity(0))
    if device == "CPU" and pinned < (os.cpu_count() or pinned):
        config["INFERENCE_NUM_THREADS"] = str(pinned)
    if inference_precision:
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    return config
