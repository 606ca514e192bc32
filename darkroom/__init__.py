"""darkroom: prompt batches to images on OpenVINO workers, through Redis, into object storage.

The producer's API: `from darkroom import GenerationRequest, submit`. Importing it never imports torch, diffusers,
openvino or nncf (worker-side code lives in `workers`).
"""

from darkroom.batches import BatchHandle, BatchSummary, batch_summary
from darkroom.convert import submit_convert
from darkroom.retry import DeadLetter, dead_letters, retry
from darkroom.submit import submit
from tasks.request import GenerationRequest
from tasks.version import __version__

__all__ = [
    "BatchHandle", "BatchSummary", "DeadLetter", "GenerationRequest", "__version__", "batch_summary", "dead_letters",
    "retry", "submit", "submit_convert",
]
