"""darkroom's built-in demo model: procedural shapes, a tiny SD pipeline trained on them, and a scorer."""

from __future__ import annotations

from pathlib import Path


def shipped_model_dir() -> Path:
    """The trained demo model that ships inside the darkroom package (package data)."""
    return Path(__file__).resolve().parents[2] / "darkroom" / "data" / "demo-model"
