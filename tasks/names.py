"""Names shared by producers and workers: task names, queue names, scheduler names.

Plain strings only: a producer machine imports this without torch, diffusers or openvino.
"""

from __future__ import annotations

GENERATE_TASK = "darkroom.generate"
CONVERT_TASK = "darkroom.convert"
CALIBRATE_TASK = "darkroom.calibrate"
GC_TASK = "darkroom.gc"

CONVERT_QUEUE = "convert"
CALIBRATE_QUEUE = "calibrate"
# Housekeeping (retention, `darkroom.gc`): its own queue, so it never waits behind an hours-long calibration.
MAINTENANCE_QUEUE = "maintenance"

# The schedulers a request may name, mapped to diffusers classes on the worker (workers/pipelines/schedulers.py).
SCHEDULER_NAMES: tuple[str, ...] = ("pndm", "ddim", "lms", "euler", "euler-a", "unipc", "dpm++2m")

# Model families (workers/pipelines/families.py maps each to its converter and OpenVINO pipeline).
FAMILIES: tuple[str, ...] = ("sd", "sdxl", "controlnet", "wuerstchen")

CALIBRATION_MODES: tuple[str, ...] = ("int8", "weights-int8", "hybrid")

# ControlNet annotators a request may name (workers/pipelines/annotators.py runs them from controlnet-aux).
ANNOTATORS: tuple[str, ...] = ("canny", "openpose", "mlsd", "hed", "lineart", "depth", "segment")


# The columns a dataset of prompts is read from, the first one present (prompt batches and calibration sets).
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "text", "caption")

# The device a request is routed to, and a worker pinned to, unless told otherwise.
DEFAULT_DEVICE = "CPU"


def generate_queue(device: str) -> str:
    """The generation queue a worker pinned to `device` consumes, e.g. generate.CPU, generate.GPU.0."""
    return f"generate.{device}"
