"""PNG encoding with the request in text chunks, byte-for-byte reproducible for the same pixels."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def encode_png(image: np.ndarray, metadata: Mapping[str, object]) -> bytes:
    """PNG bytes of an HxWx3 uint8 image with one tEXt chunk per metadata field (sorted, no timestamps)."""
    info = PngInfo()
    for key in sorted(metadata):
        info.add_text(key, str(metadata[key]))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_png_metadata(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return dict(img.text)  # type: ignore[attr-defined]
