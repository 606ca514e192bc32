"""Device pinning: one worker per OpenVINO device, with the compile settings that device gets."""

from __future__ import annotations

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


def available_devices(core: Any | None = None) -> list[str]:
    import openvino as ov

    return list((core or ov.Core()).available_devices)


def compile_config(device: str, *, cache_dir: Path, inference_precision: str = "") -> dict[str, str]:
    """OpenVINO properties for compiling a model on `device` in a worker.

    The compiled-blob cache makes a restarted worker warm in seconds; LATENCY suits one image at a time.
    """
    config = {"CACHE_DIR": str(cache_dir), "PERFORMANCE_HINT": "LATENCY"}
    if inference_precision:
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    return config
