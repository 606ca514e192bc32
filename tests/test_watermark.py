"""The optional invisible watermark (invisible-watermark, import name imwatermark): off unless asked for."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from workers.pipelines import watermark
from workers.pipelines.png import encode_png, read_png_metadata


def _picture(side: int = 256) -> np.ndarray:
    rng = np.random.default_rng(3)
    small = Image.fromarray((rng.random((side // 16, side // 16, 3)) * 255).astype(np.uint8))
    return np.asarray(small.resize((side, side), Image.BICUBIC))


def test_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(watermark.ENV, raising=False)
    image = _picture()
    out, meta = watermark.apply(image, None)
    assert out is image and meta == {}


def test_a_request_marks_the_image_and_the_mark_survives_png(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(watermark.ENV, raising=False)
    image = _picture()
    out, meta = watermark.apply(image, "batch-7 ©")
    assert meta == {"watermark": "batch-7 ©", "watermark_method": "dwtDctSvd", "watermark_bits": 80}
    assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)
    png = encode_png(out, meta)
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    bits = int(read_png_metadata(png)["watermark_bits"])
    assert watermark.decode(decoded, bits).decode("utf-8") == "batch-7 ©"
    # An unmarked image does not decode to the text by chance.
    assert watermark.decode(image, bits) != "batch-7 ©".encode()


def test_the_worker_setting_applies_and_a_request_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(watermark.ENV, "farm-a")
    assert watermark.apply(_picture(), None)[1]["watermark"] == "farm-a"
    assert watermark.apply(_picture(), "mine")[1]["watermark"] == "mine"


def test_too_small_an_image_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="at least 65536 pixels"):
        watermark.embed(_picture(128), "x")
