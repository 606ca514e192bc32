"""darkroom's version: recorded in every artifact and image a worker writes, and shown by the client."""

__version__ = "0.1.0"
