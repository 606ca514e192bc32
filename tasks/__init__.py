"""The contract between producers and workers: task names, the request object, job and result schemas, errors,
seeds and limits. Nothing else: no client, no broker, no ML library (import-linter holds it to that).

Producers submit through the `darkroom` package (`from darkroom import submit`); workers run what they receive.
"""

from tasks.errors import DarkroomError, InvalidRequest, InvalidRequests, ServiceUnavailable, TransientError
from tasks.names import CONVERT_TASK, GENERATE_TASK, SCHEDULER_NAMES, generate_queue
from tasks.schemas import ConvertJob, GenerateJob, ItemRequest, ItemResult, Limits

__all__ = [
    "CONVERT_TASK", "GENERATE_TASK", "SCHEDULER_NAMES", "ConvertJob", "DarkroomError", "GenerateJob",
    "InvalidRequest", "InvalidRequests", "ItemRequest", "ItemResult", "Limits", "ServiceUnavailable",
    "TransientError", "generate_queue",
]
