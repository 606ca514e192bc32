"""darkroom: prompt batches to images on OpenVINO workers, through Redis, into object storage."""

__version__ = "0.1.0"
