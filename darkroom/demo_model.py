"""Where the built-in demo model lives: package data of darkroom, read by `darkroom demo` and `darkroom score`."""

from __future__ import annotations

from pathlib import Path


def shipped_model_dir() -> Path:
    """The trained demo model (a diffusers folder in fp16, with its scorer) that ships inside the darkroom package."""
    return Path(__file__).resolve().parent / "data" / "demo-model"
