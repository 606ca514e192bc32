"""The weightless compiled-blob cache on CPU (CACHE_MODE=OPTIMIZE_SIZE): small blobs, same pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from storage import Storage
from tests.conftest import stored_tiny_artifact
from workers.runtime.blob_cache import SharedBlobCache, WeightsPathCore, device_signature
from workers.runtime.device import compile_config

KWARGS = {"prompt": "a lighthouse at dusk", "negative_prompt": "", "steps": 3, "guidance_scale": 7.0, "seed": 3,
          "scheduler": "pndm"}


@pytest.fixture(scope="module")
def artifact(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Storage, str, Path]:
    """The tiny model converted and stored as an artifact; also the converted IR folder."""
    return stored_tiny_artifact(tiny_sd_dir, tmp_path_factory.mktemp("weightless-store"), "tiny-wl")


def _pool(storage: Storage, cache_dir: Path, *, weightless: bool = True) -> Any:
    import openvino as ov

    from workers.runtime.pool import ModelPool

    core = ov.Core()
    blobs = SharedBlobCache(storage, cache_dir / "ov-cache", device="CPU", signature=device_signature(core, "CPU"))
    config = compile_config("CPU", cache_dir=cache_dir / "ov-cache", weightless=weightless)
    return ModelPool(storage, cache_dir=cache_dir, device="CPU", ov_config=config, core=core, blob_cache=blobs)


def _sizes(folder: Path, suffix: str) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob(f"*{suffix}")}


def test_cpu_compiles_with_a_weightless_cache_unless_told_not_to(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DARKROOM_WEIGHTLESS_CACHE", raising=False)
    assert compile_config("CPU", cache_dir=tmp_path)["CACHE_MODE"] == "OPTIMIZE_SIZE"
    monkeypatch.setenv("DARKROOM_WEIGHTLESS_CACHE", "0")
    assert "CACHE_MODE" not in compile_config("CPU", cache_dir=tmp_path)
    assert compile_config("CPU", cache_dir=tmp_path, weightless=True)["CACHE_MODE"] == "OPTIMIZE_SIZE"
    assert "CACHE_MODE" not in compile_config("CPU", cache_dir=tmp_path, weightless=False)
    assert "CACHE_MODE" not in compile_config("GPU", cache_dir=tmp_path)


def test_weightless_blobs_are_a_small_fraction_of_the_weights_and_draw_the_same(
        artifact: tuple[Storage, str, Path], tmp_path: Path) -> None:
    storage, fingerprint, ir_dir = artifact
    # 1. A full-blob worker (the old mode) and a weightless one compile the same three models.
    full = _pool(storage, tmp_path / "full", weightless=False)
    expected = full.get("tiny-wl", "fp32", fingerprint, width=64, height=64, cfg=True).generate(**KWARGS)
    first = _pool(storage, tmp_path / "first")
    image_a = first.get("tiny-wl", "fp32", fingerprint, width=64, height=64, cfg=True).generate(**KWARGS)
    full_blobs = _sizes(full.blob_cache.local_dir("tiny-wl", "fp32", fingerprint), ".blob")
    blobs = _sizes(first.blob_cache.local_dir("tiny-wl", "fp32", fingerprint), ".blob")
    weights = sum(_sizes(ir_dir, ".bin").values())  # all of the IR's weights, not only the three compiled
    assert len(blobs) == 3 and first.stats.blobs_pushed == 3
    # The blobs hold the compiled graphs only: much smaller than the weights a full blob carries.
    #    (Tiny models: the graph is a bigger share here than in SD-1.5, where a blob is 1-2 % of its weights.)
    assert sum(blobs.values()) < 0.25 * sum(full_blobs.values()), (blobs, full_blobs)
    assert sum(blobs.values()) < 0.25 * weights, (blobs, weights)
    assert image_a.image.tobytes() == expected.image.tobytes()
    # 2. A fresh worker pulls the small blobs and imports them (none rewritten, nothing pushed back), mapping the
    #    weights from its own copy of the IR: the same picture.
    second = _pool(storage, tmp_path / "second")
    image_b = second.get("tiny-wl", "fp32", fingerprint, width=64, height=64, cfg=True).generate(**KWARGS)
    local = second.blob_cache.local_dir("tiny-wl", "fp32", fingerprint)
    assert (second.stats.blobs_pulled, second.stats.blobs_pushed) == (3, 0)
    assert _sizes(local, ".blob") == blobs
    assert image_b.image.tobytes() == expected.image.tobytes()


def test_a_cached_weightless_compile_is_an_import_with_identical_outputs(artifact: tuple[Storage, str, Path],
                                                                        tmp_path: Path) -> None:
    """The UNet as a worker compiles it (read, reshaped to static shapes): the second compile imports the
    weightless blob, and its outputs are bit-identical to the first's."""
    import json

    import openvino as ov

    from workers.pipelines.sd import read_static

    _, _, ir_dir = artifact
    unet = json.loads((ir_dir / "unet" / "config.json").read_text())
    shapes = {"sample": [2, unet["in_channels"], 8, 8], "encoder_hidden_states": [2, 77, unet["cross_attention_dim"]]}
    config = compile_config("CPU", cache_dir=tmp_path / "cache", weightless=True)
    outputs, loaded = [], []
    for _ in range(2):
        core = WeightsPathCore(ov.Core())
        compiled = core.compile_model(read_static(core, ir_dir / "unet", shapes), "CPU", config)
        rng = np.random.default_rng(0)
        inputs = {port.get_any_name(): rng.standard_normal(list(port.get_shape())).astype(
            port.get_element_type().to_dtype()) for port in compiled.inputs}
        outputs.append(compiled(inputs)[0])
        loaded.append(bool(compiled.get_property("LOADED_FROM_CACHE")))
    assert loaded == [False, True]
    assert np.array_equal(outputs[0], outputs[1])
    assert len(_sizes(tmp_path / "cache", ".blob")) == 1


def test_a_model_not_read_from_an_ir_gets_a_full_blob(tmp_path: Path) -> None:
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([1, 64], np.float32, name="x")
    weight = ops.constant(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    model = ov.Model([ops.matmul(x, weight, False, False)], [x], "built")
    core = WeightsPathCore(ov.Core())
    config = compile_config("CPU", cache_dir=tmp_path, weightless=True)
    for expect_cached in (False, True):
        compiled = core.compile_model(model, "CPU", config)
        assert bool(compiled.get_property("LOADED_FROM_CACHE")) is expect_cached
    assert sum(_sizes(tmp_path, ".blob").values()) > 64 * 64 * 4  # the weights are in it

