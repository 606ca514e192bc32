"""The contract between producers and workers: names, schemas, errors and `submit(...)`.

Importing this package never imports torch, diffusers, openvino or nncf. The producer functions are
loaded on first use, so `broker` can import `tasks.names` without a cycle.
"""

from typing import Any

from tasks.errors import DarkroomError, InvalidRequest, InvalidRequests, ServiceUnavailable, TransientError
from tasks.names import CONVERT_TASK, GENERATE_TASK, SCHEDULER_NAMES, generate_queue
from tasks.schemas import ConvertJob, GenerateJob, ItemRequest, ItemResult, Limits

_PRODUCER = ("BatchHandle", "BatchSummary", "batch_summary", "submit", "submit_convert")

__all__ = [
    "CONVERT_TASK", "GENERATE_TASK", "SCHEDULER_NAMES", "ConvertJob", "DarkroomError", "GenerateJob",
    "InvalidRequest", "InvalidRequests", "ItemRequest", "ItemResult", "Limits", "ServiceUnavailable",
    "TransientError", "generate_queue", *_PRODUCER,
]


def __getattr__(name: str) -> Any:
    if name in _PRODUCER:
        from tasks import producer

        return getattr(producer, name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
