"""Image-to-image for SD 1.x: parity with diffusers' StableDiffusionImg2ImgPipeline, the queue, bad inputs.

Also the invisible watermark through the queue (it shares this module's worker): off by default, on with
`--watermark`, recorded in the PNG metadata and decodable from the stored image.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from broker.settings import Settings
from darkroom import submit, submit_convert
from darkroom.init_images import resolve_init_images
from darkroom.prompts import load_prompts
from storage import keys, open_storage
from tasks.errors import InvalidRequest, InvalidRequests
from tasks.families import family_rules
from tasks.request import GenerationRequest
from testkit.fleet import WorkerProcess, run_cli
from tests.conftest import queue_settings_for, redis_db_url
from workers.pipelines.png import read_png_metadata

PROMPT = "a dog wearing hat"
NEGATIVE = "blurry, low quality"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _init_array(side: int = 64, seed: int = 0) -> np.ndarray:
    # Smooth blobs rather than white noise: closer to a photo, and the VAE's latent then carries it.
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((side // 8, side // 8, 3)) * 255).astype(np.uint8))
    return np.asarray(small.resize((side, side), Image.BICUBIC))


@pytest.fixture(scope="module")
def init_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "init.png"
    Image.fromarray(_init_array()).save(path)
    return path


@pytest.fixture(scope="module")
def ir_dir(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.convert.sd import convert_sd

    return convert_sd(tiny_sd_dir, tmp_path_factory.mktemp("ir") / "sd", weight_format="fp32").out_dir


@pytest.mark.parametrize("scheduler,strength", [("pndm", 0.5), ("euler-a", 0.75), ("dpm++2m", 1.0),
                                                ("ddim", 0.3)])
def test_matches_diffusers_img2img(scheduler: str, strength: float, ir_dir: Path, tiny_sd_dir: Path) -> None:
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    from workers.pipelines.img2img import OVStableDiffusionImg2Img
    from workers.pipelines.schedulers import make_scheduler

    init = _init_array()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_dir, safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    expected = pipe(PROMPT, image=Image.fromarray(init), strength=strength, negative_prompt=NEGATIVE,
                    num_inference_steps=5, guidance_scale=7.5, output_type="np",
                    generator=torch.Generator().manual_seed(7)).images[0]
    expected = (expected * 255).round().astype(np.uint8)
    ov_pipe = OVStableDiffusionImg2Img.load(ir_dir, width=64, height=64, cfg=True, ov_config=F32)
    out = ov_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance_scale=7.5, scheduler=scheduler,
                           seed=7, init_image=init, strength=strength)
    assert int(np.abs(out.image.astype(np.int16) - expected.astype(np.int16)).max()) <= 1
    if strength == 1.0:
        return  # all noise: the init image only sets the size (as in diffusers)
    # The init image matters: another one gives another picture.
    other = ov_pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=5, guidance_scale=7.5, scheduler=scheduler,
                             seed=7, init_image=_init_array(seed=1), strength=strength)
    assert int(np.abs(out.image.astype(np.int16) - other.image.astype(np.int16)).max()) > 5


def test_the_pipeline_refuses_bad_arguments(ir_dir: Path) -> None:
    from workers.pipelines.img2img import OVStableDiffusionImg2Img

    pipe = OVStableDiffusionImg2Img.load(ir_dir, width=64, height=64, cfg=False, ov_config=F32)
    common = {"steps": 4, "guidance_scale": 1.0, "scheduler": "euler", "seed": 1}
    with pytest.raises(ValueError, match="strength"):
        pipe.generate(PROMPT, init_image=_init_array(), strength=1.5, **common)
    with pytest.raises(ValueError, match="no denoising step"):
        pipe.generate(PROMPT, init_image=_init_array(), strength=0.1, **common)
    with pytest.raises(ValueError, match="64x64 RGB"):
        pipe.generate(PROMPT, init_image=_init_array(side=72), strength=0.5, **common)


# --- Producer-side checks: no services needed beyond a local storage folder. ---

def _lines(rows: list[dict[str, object]]) -> tuple:
    return load_prompts(rows).items


def _resolve(lines: tuple, storage: Any, base_dir: Path | None = None, **options: Any) -> dict[int, dict[str, Any]]:
    """The init images of `lines` under a request of model "m" with these batch-wide options."""
    request = GenerationRequest.build(["-"], model="m", **options)
    return resolve_init_images(lines, request, storage, base_dir)


def test_bad_init_inputs_name_the_field_and_line(tmp_path: Path, init_png: Path) -> None:
    storage = open_storage(str(tmp_path / "storage"))
    common = {"storage": storage, "steps": 20, "base_dir": tmp_path}
    with pytest.raises(InvalidRequest) as missing:
        _resolve(_lines([{"prompt": "a"}]), init_image=tmp_path / "nope.png", **common)
    assert missing.value.field == "init_image" and "nope.png" in str(missing.value)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(InvalidRequest, match="not a readable image") as unreadable:
        _resolve(_lines([{"prompt": "a"}, {"prompt": "b", "init_image": "garbage.png"}]), **common)
    assert unreadable.value.field == "init_image" and unreadable.value.line == 2
    with pytest.raises(InvalidRequest, match="outside") as bad_strength:
        _resolve(_lines([{"prompt": "a"}]), init_image=init_png, strength=1.5, **common)
    assert bad_strength.value.field == "strength"
    with pytest.raises(InvalidRequest, match="no denoising step"):
        _resolve(_lines([{"prompt": "a", "steps": 2}]), init_image=init_png, strength=0.2, **common)
    with pytest.raises(InvalidRequest, match="image-to-image needs an SD 1.x model") as wrong_family:
        family_rules("sdxl").check_request({"init_image": str(init_png)}, model="m")
    assert wrong_family.value.field == "init_image"
    with pytest.raises(InvalidRequest, match="not resized"):
        _resolve(_lines([{"prompt": "a", "width": 128}]), init_image=init_png, **common)
    odd = tmp_path / "odd.png"
    Image.fromarray(_init_array()[:60]).save(odd)
    with pytest.raises(InvalidRequest, match="multiples of 8"):
        _resolve(_lines([{"prompt": "a"}]), init_image=odd, **common)
    with pytest.raises(InvalidRequest, match="without an init image"):
        _resolve(_lines([{"prompt": "a", "strength": 0.5}]), **common)
    # Out-of-range strength in a prompt file is caught with the line, like any other field.
    parsed = load_prompts([{"prompt": "a"}, {"prompt": "b", "strength": 0}])
    assert [(p.line, p.field) for p in parsed.problems] == [(2, "strength")]
    assert storage.list_keys("inputs/") == []  # nothing uploaded for a refused request


def test_init_images_are_uploaded_once_under_a_content_key(tmp_path: Path, init_png: Path) -> None:
    storage = open_storage(str(tmp_path / "storage"))
    lines = _lines([{"prompt": "a"}, {"prompt": "b", "strength": 0.3}, {"prompt": "c"}])
    fields = _resolve(lines, storage, init_image=init_png, strength=0.6, steps=10)
    assert {f["init_image"] for f in fields.values()} == {storage.uri(k) for k in storage.list_keys("inputs/")}
    assert [f["strength"] for f in fields.values()] == [0.6, 0.3, 0.6]
    assert all((f["width"], f["height"]) == (64, 64) for f in fields.values())
    key = storage.list_keys("inputs/")[0]
    assert keys.init_image_digest_of(fields[1]["init_image"]) in key


# --- Through the queue. ---

@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("img2img-queue"), redis_db_url(redis_server, 9))


@pytest.fixture(scope="module")
def model(settings: Settings, tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process = WorkerProcess(settings, ["generate.CPU", "convert"], tmp_path_factory.mktemp("logs") / "w.log")
    process.start()
    try:
        outcome = submit_convert(str(tiny_sd_dir), name="tiny", weight_format="fp32", settings=settings).get(
            timeout=600)
        assert outcome["status"] == "done", outcome
        yield "tiny"
    finally:
        process.stop()


def test_img2img_through_the_queue_matches_the_local_pipeline(model: str, settings: Settings, ir_dir: Path,
                                                              init_png: Path, tmp_path: Path) -> None:
    from workers.pipelines.img2img import OVStableDiffusionImg2Img

    # A JSONL batch: line 1 starts from the batch's init image, line 2 from its own file and strength.
    other = tmp_path / "other.png"
    Image.fromarray(_init_array(seed=1)).save(other)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "seed": 3}) + "\n"
                       + json.dumps({"prompt": PROMPT, "seed": 4, "init_image": "other.png", "strength": 1.0}) + "\n")
    handle = submit(prompts, model=model, steps=4, scheduler="euler", init_image=init_png, strength=0.5,
                    negative_prompt=NEGATIVE, settings=settings)
    summary = handle.wait(timeout=300)
    assert (summary.done, summary.failed) == (2, 0), summary
    storage = open_storage(settings.storage_url)
    pipe = OVStableDiffusionImg2Img.load(ir_dir, width=64, height=64, cfg=True, ov_config=F32)
    for item, init, strength in zip(summary.items, (_init_array(), _init_array(seed=1)), (0.5, 1.0), strict=True):
        data = storage.get_bytes(keys.image_key(summary.batch_id, item.index))
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        expected = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=4, guidance_scale=7.5, scheduler="euler",
                                 seed=item.seed, init_image=init, strength=strength).image
        assert int(np.abs(image.astype(np.int16) - expected.astype(np.int16)).max()) <= 1, item
        meta = read_png_metadata(data)
        assert float(meta["strength"]) == strength and meta["init_image"].endswith(".png")
        assert "watermark" not in meta  # off by default
    assert len(storage.list_keys("inputs/")) == 2


def test_bad_img2img_requests_are_one_clear_line(model: str, settings: Settings, tmp_path: Path,
                                                 init_png: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    for args, needle in ((["--init-image", str(tmp_path / "missing.png")], "init_image"),
                         (["--init-image", str(init_png), "--strength", "0"], "strength"),
                         (["--init-image", str(prompts)], "not a readable image"),
                         (["--watermark", "mark"], "at least 256x256")):
        done = run_cli("submit", str(prompts), "--model", model, "--steps", "3", *args, settings=settings)
        assert done.returncode == 2, (args, done.stderr)
        assert needle in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)


def test_a_watermarked_batch_decodes_and_records_the_mark(model: str, settings: Settings) -> None:
    from workers.pipelines import watermark

    handle = submit([PROMPT], model=model, steps=2, width=256, height=256, seed=5, watermark="darkroom-42",
                    settings=settings)
    summary = handle.wait(timeout=300)
    assert summary.done == 1, summary
    data = open_storage(settings.storage_url).get_bytes(keys.image_key(summary.batch_id, 0))
    meta = read_png_metadata(data)
    assert (meta["watermark"], meta["watermark_method"], meta["watermark_bits"]) == ("darkroom-42", "dwtDctSvd", "88")
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert watermark.decode(image, int(meta["watermark_bits"])) == b"darkroom-42"


def test_invalid_requests_raise_before_enqueueing(model: str, settings: Settings, tmp_path: Path,
                                                  init_png: Path) -> None:
    prompts = tmp_path / "two.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "init_image": "nope.png"}) + "\n"
                       + json.dumps({"prompt": "b", "strength": 2}) + "\n")
    with pytest.raises((InvalidRequest, InvalidRequests)) as bad:
        submit(prompts, model=model, steps=3, settings=settings)
    assert "line 2" in str(bad.value) and "strength" in str(bad.value)
