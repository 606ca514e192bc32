"""Optional invisible watermark on outputs, with the `invisible-watermark` package (import name imwatermark).

Off by default. A batch asks for one with `darkroom submit --watermark TEXT`; a worker can mark everything it
renders with `DARKROOM_WATERMARK=TEXT` (a request's own text wins). The text is embedded as its UTF-8 bits with
the DWT-DCT-SVD method (plain DWT-DCT, diffusers' SDXL choice, lost bits on busy images here) and recorded
in the PNG metadata (`watermark`, `watermark_method`, `watermark_bits`), which a reader needs to decode it.
"""

from __future__ import annotations

import os

import numpy as np

METHOD = "dwtDctSvd"
ENV = "DARKROOM_WATERMARK"
# imwatermark's own floor: its DWT methods need at least 256x256 pixels (checked at submit too).
MIN_PIXELS = 256 * 256


def watermark_text(requested: str | None) -> str | None:
    """The text to embed: the request's, else the worker's DARKROOM_WATERMARK, else None (no watermark)."""
    return requested or os.environ.get(ENV, "").strip() or None


def embed(image: np.ndarray, text: str) -> np.ndarray:
    """`image` (HxWx3 uint8 RGB) with `text` embedded invisibly; ValueError if the image is too small."""
    from imwatermark import WatermarkEncoder

    height, width = image.shape[:2]
    if height * width < MIN_PIXELS:
        raise ValueError(f"an invisible watermark needs an image of at least {MIN_PIXELS} pixels (256x256), "
                         f"this one is {width}x{height}")
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", text.encode("utf-8"))
    # imwatermark works on OpenCV's BGR order.
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    marked = encoder.encode(bgr, METHOD)
    return np.ascontiguousarray(np.clip(marked, 0, 255).astype(np.uint8)[:, :, ::-1])


def decode(image: np.ndarray, bits: int) -> bytes:
    """The `bits` watermark bits found in `image` (HxWx3 uint8 RGB), as bytes."""
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", bits)
    return bytes(decoder.decode(np.ascontiguousarray(image[:, :, ::-1]), METHOD))


def apply(image: np.ndarray, requested: str | None) -> tuple[np.ndarray, dict[str, object]]:
    """The image to store and the PNG metadata that records the watermark ({} when there is none)."""
    text = watermark_text(requested)
    if text is None:
        return image, {}
    marked = embed(image, text)
    return marked, {"watermark": text, "watermark_method": METHOD, "watermark_bits": 8 * len(text.encode("utf-8"))}
