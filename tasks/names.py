"""Names shared by producers and workers: task names, queue names, scheduler names.

Plain strings only: a producer machine imports this without torch, diffusers or openvino.
"""

from __future__ import annotations

GENERATE_TASK = "darkroom.generate"
CONVERT_TASK = "darkroom.convert"
CALIBRATE_TASK = "darkroom.calibrate"
GC_TASK = "darkroom.gc"
# A batch's webhook event POSTed by a worker (broker/webhooks.py), on the batch's own high priority queue.
WEBHOOK_TASK = "darkroom.webhook"

# Webhook events: a batch sends one of the three when it finishes; item.done (one per rendered item) only if asked.
BATCH_WEBHOOK_EVENTS: tuple[str, ...] = ("batch.completed", "batch.failed", "batch.cancelled")
ITEM_DONE_EVENT = "item.done"
WEBHOOK_EVENTS: tuple[str, ...] = (*BATCH_WEBHOOK_EVENTS, ITEM_DONE_EVENT)

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


# Batch priorities. Each is a queue of its own beside a generation queue (normal: the queue itself, e.g.
# generate.CPU; high: generate.CPU.high; low: generate.CPU.low), and a worker consumes them strictly in this order.
PRIORITIES: tuple[str, ...] = ("high", "normal", "low")
DEFAULT_PRIORITY = "normal"


def priority_queue(queue: str, priority: str) -> str:
    """The queue a batch of `priority` goes to, beside generation queue `queue`."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown priority {priority!r}; choose one of {', '.join(PRIORITIES)}")
    return queue if priority == DEFAULT_PRIORITY else f"{queue}.{priority}"


def split_priority(queue: str) -> tuple[str, str]:
    """(generation queue, priority) of a queue name: generate.CPU.high -> (generate.CPU, high)."""
    for priority in PRIORITIES:
        if priority != DEFAULT_PRIORITY and queue.endswith(f".{priority}"):
            return queue[: -len(priority) - 1], priority
    return queue, DEFAULT_PRIORITY


def generate_queue(device: str) -> str:
    """The generation queue a worker pinned to `device` consumes, e.g. generate.CPU, generate.GPU.0."""
    return f"generate.{device}"
