"""SDXL-class models (SDXL, SSD-1B): family detection, conversion through the queue, parity with diffusers.

Tiny random-weight SDXL and SSD-1B-shaped pipelines are converted by a real `darkroom worker` (fp32) into
real storage; darkroom's OpenVINO pipeline, loaded from that artifact with f32 inference, matches diffusers'
StableDiffusionXLPipeline on the same seed within one uint8 level; and a batch renders through the queue.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from broker.settings import Settings
from darkroom import submit, submit_convert
from storage import keys, open_storage
from testkit.fleet import WorkerProcess, run_cli
from tests.conftest import queue_settings_for, redis_db_url
from workers.pipelines.families import UnknownFamily, check_family, detect_family
from workers.pipelines.png import read_png_metadata

PROMPT = "a dog wearing hat"
NEGATIVE = "blurry, low quality"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
VARIANTS = ("sdxl", "ssd-1b")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from testkit.tiny_models import build_tiny_sdxl

    root = tmp_path_factory.mktemp("tiny-sdxl")
    return {v: build_tiny_sdxl(root / v, seed=0, variant=v) for v in VARIANTS}  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("sdxl-queue"), redis_db_url(redis_server, 9))


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    process = WorkerProcess(settings, ["generate.CPU", "convert"], tmp_path_factory.mktemp("logs") / "w.log")
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def converted(worker: WorkerProcess, sources: dict[str, Path], settings: Settings) -> dict[str, dict[str, Any]]:
    """Each variant converted by the worker (fp32), through the convert queue, with the family detected."""
    outcomes = {}
    for variant, source in sources.items():
        outcome = submit_convert(str(source), name=f"tiny-{variant}", weight_format="fp32",
                                 settings=settings).get(timeout=900)
        assert outcome["status"] == "done", outcome
        outcomes[variant] = outcome
    return outcomes


def _artifact_dir(settings: Settings, outcome: dict[str, Any]) -> Path:
    # Local storage is a folder: the artifact as the worker uploaded it.
    prefix = keys.model_artifact_prefix(outcome["name"], outcome["precision"], outcome["fingerprint"])
    return Path(settings.storage_url) / prefix


@pytest.fixture(scope="module")
def reference(sources: dict[str, Path]) -> Callable[..., np.ndarray]:
    import torch
    from diffusers import StableDiffusionXLPipeline

    from workers.pipelines.schedulers import make_scheduler

    pipes = {}
    for variant, path in sources.items():
        # add_watermarker=False: diffusers would otherwise watermark SDXL output when imwatermark is installed.
        pipe = StableDiffusionXLPipeline.from_pretrained(path, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        pipes[variant] = (pipe, dict(pipe.scheduler.config))

    def run(variant: str, scheduler: str, *, guidance: float, negative: str, seed: int = 7, steps: int = 4,
            width: int = 64, height: int = 64) -> np.ndarray:
        pipe, config = pipes[variant]
        pipe.scheduler = make_scheduler(scheduler, config)
        image = pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                     width=width, height=height, output_type="np",
                     generator=torch.Generator().manual_seed(seed)).images[0]
        return (image * 255).round().astype(np.uint8)

    return run


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def test_family_is_detected_and_a_mismatch_is_named(sources: dict[str, Path], tiny_sd_dir: Path,
                                                     tmp_path: Path) -> None:
    assert detect_family(sources["sdxl"]) == detect_family(sources["ssd-1b"]) == "sdxl"
    assert detect_family(tiny_sd_dir) == "sd"
    assert check_family(sources["sdxl"], "sdxl") == "sdxl"
    with pytest.raises(UnknownFamily, match="family 'sd' does not fit.*'sdxl' model"):
        check_family(sources["sdxl"], "sd")
    with pytest.raises(UnknownFamily, match="unknown model family 'sd3'"):
        check_family(sources["sdxl"], "sd3")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UnknownFamily, match="no model family converts a KandinskyPipeline"):
        detect_family(odd)


def test_tiny_ssd1b_is_a_distilled_sdxl_unet(sources: dict[str, Path]) -> None:
    def transformer_layers(variant: str) -> int:
        config = json.loads((sources[variant] / "unet" / "config.json").read_text())
        per_block = config["transformer_layers_per_block"]
        return sum(sum(b) if isinstance(b, list) else b * config["layers_per_block"] for b in per_block)

    assert transformer_layers("ssd-1b") < transformer_layers("sdxl")


def test_conversion_writes_the_sdxl_layout_and_records_the_family(converted: dict[str, dict[str, Any]],
                                                                  settings: Settings) -> None:
    import openvino as ov

    core = ov.Core()
    for variant, outcome in converted.items():
        assert outcome["family"] == "sdxl", variant
        folder = _artifact_dir(settings, outcome)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["family"] == "sdxl" and manifest["defaults"]["width"] == 64
        unet = core.read_model(folder / "unet" / "openvino_model.xml")
        assert [p.get_any_name() for p in unet.inputs] == ["sample", "timestep", "encoder_hidden_states",
                                                           "text_embeds", "time_ids"]
        encoder_2 = core.read_model(folder / "text_encoder_2" / "openvino_model.xml")
        names = [p.get_any_name() for p in encoder_2.outputs]
        assert names[:2] == ["text_embeds", "last_hidden_state"] and "hidden_states.2" in names
        assert (folder / "tokenizer_2" / "tokenizer.json").is_file()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scheduler,guidance,negative", [("euler", 7.5, NEGATIVE), ("dpm++2m", 7.5, ""),
                                                         ("euler-a", 1.0, "")],
                         ids=["cfg-negative", "cfg-empty-negative", "no-cfg"])
def test_matches_diffusers(variant: str, scheduler: str, guidance: float, negative: str,
                           converted: dict[str, dict[str, Any]], settings: Settings,
                           reference: Callable[..., np.ndarray]) -> None:
    from workers.pipelines.sdxl import OVStableDiffusionXL

    pipe = OVStableDiffusionXL.load(_artifact_dir(settings, converted[variant]), width=64, height=64,
                                    cfg=guidance > 1, ov_config=F32)
    out = pipe.generate(PROMPT, negative_prompt=negative, steps=4, guidance_scale=guidance, scheduler=scheduler,
                        seed=7)
    expected = reference(variant, scheduler, guidance=guidance, negative=negative)
    assert max_diff(out.image, expected) <= 1
    assert out.image.std() > 5  # a real picture, not a flat one that would match anything flat


def test_a_batch_renders_through_the_queue_as_diffusers_does(converted: dict[str, dict[str, Any]],
                                                            settings: Settings,
                                                            reference: Callable[..., np.ndarray]) -> None:
    handle = submit([{"prompt": PROMPT, "seed": 11}, {"prompt": PROMPT, "seed": 12}], model="tiny-ssd-1b",
                    steps=3, scheduler="euler", negative_prompt=NEGATIVE, settings=settings)
    summary = handle.wait(timeout=600)
    assert (summary.done, summary.failed) == (2, 0), summary
    storage = open_storage(settings.storage_url)
    for item in summary.items:
        data = storage.get_bytes(keys.image_key(summary.batch_id, item.index))
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # type: ignore[no-untyped-call]
        expected = reference("ssd-1b", "euler", guidance=7.5, negative=NEGATIVE, seed=item.seed, steps=3)
        assert max_diff(image, expected) <= 1, item
        assert read_png_metadata(data)["model"] == "tiny-ssd-1b"


def test_wrong_and_unknown_families_are_one_clear_line(worker: WorkerProcess, settings: Settings,
                                                        tiny_sd_dir: Path, sources: dict[str, Path]) -> None:
    # An SD 1.x folder converted as SDXL: the worker refuses it before converting anything.
    wrong = run_cli("convert", str(tiny_sd_dir), "--name", "wrong", "--family", "sdxl", settings=settings)
    assert wrong.returncode == 2, wrong.stderr
    assert "family 'sdxl' does not fit" in wrong.stderr and "'sd' model" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    unknown = run_cli("convert", str(sources["sdxl"]), "--name", "x", "--family", "sd9", settings=settings)
    assert unknown.returncode == 2 and "unknown model family 'sd9'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    storage = open_storage(settings.storage_url)
    assert not storage.list_keys(keys.models_prefix() + "wrong/")
