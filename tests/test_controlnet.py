"""ControlNet (SD 1.x): conversion, parity with diffusers, control images through the real queue, calibration."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from broker.settings import Settings
from darkroom import submit
from darkroom.calibration import calibrate_job, submit_calibrate
from storage import keys, open_storage
from testkit.fleet import WorkerProcess, convert_model, run_cli, running_worker
from tests.conftest import queue_settings_for, redis_db_url
from workers.pipelines.png import read_png_metadata

FAST = {"steps": 3}


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testkit.tiny_models import build_tiny_controlnet

    return build_tiny_controlnet(tmp_path_factory.mktemp("tiny-controlnet") / "model", seed=0)


def _control(seed: int, size: int = 64) -> np.ndarray:
    from workers.pipelines.controlnet import procedural_control

    return procedural_control(size, size, seed=seed)


def test_converted_controlnet_matches_diffusers(controlnet_dir: Path, tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionControlNetPipeline

    from workers.convert.controlnet import convert_controlnet
    from workers.pipelines.controlnet import OVControlNetPipeline

    result = convert_controlnet(controlnet_dir, tmp_path / "ir", weight_format="fp32")
    assert result.family == "controlnet"
    for name in ("controlnet/openvino_model.xml", "unet/openvino_model.xml", "text_encoder/openvino_model.xml",
                 "vae_decoder/openvino_model.xml", "controlnet/config.json", "model_index.json"):
        assert name in result.files, name
    pipe = OVControlNetPipeline.load(result.out_dir, width=64, height=64, cfg=True,
                                     ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    reference = StableDiffusionControlNetPipeline.from_pretrained(controlnet_dir, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    control = _control(1)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
    args = {"negative_prompt": "blurry", "guidance_scale": 7.5}
    ours = {}
    for scale in (0.7, 0.0):
        ours[scale] = pipe.generate("a red house", steps=6, scheduler="unipc", seed=5, latents=latents.numpy(),
                                    control_image=control, controlnet_scale=scale, **args).image
    theirs = reference("a red house", image=Image.fromarray(control), num_inference_steps=6, latents=latents,
                       controlnet_conditioning_scale=0.7, output_type="np", **args).images[0]
    theirs = (theirs * 255).round().astype(np.uint8)
    assert np.abs(ours[0.7].astype(int) - theirs.astype(int)).max() <= 1
    # The control path does something: scale 0 (no control) and another control image both change the image.
    assert np.abs(ours[0.7].astype(int) - ours[0.0].astype(int)).max() > 10
    other = pipe.generate("a red house", steps=6, scheduler="unipc", seed=5, latents=latents.numpy(),
                          control_image=_control(2), controlnet_scale=0.7, **args).image
    assert np.abs(other.astype(int) - ours[0.7].astype(int)).max() > 10
    with pytest.raises(ValueError, match="control image must be 64x64"):
        pipe.generate("x", steps=1, guidance_scale=7.5, scheduler="unipc", seed=0, control_image=_control(1, 32))


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("controlnet"), redis_db_url(redis_server, 10))


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    with running_worker(settings, ["generate.CPU", "convert", "calibrate"], tmp_path_factory) as w:
        yield w


@pytest.fixture(scope="module")
def models(worker: WorkerProcess, settings: Settings, controlnet_dir: Path, tiny_sd_dir: Path) -> dict[str, str]:
    return {name: convert_model(settings, source, name)["family"]
            for name, source in (("cn", controlnet_dir), ("plain", tiny_sd_dir))}


def test_conversion_through_the_queue_records_the_family(models: dict[str, str], settings: Settings) -> None:
    assert models == {"cn": "controlnet", "plain": "sd"}
    storage = open_storage(settings.storage_url)
    default = storage.get_json(keys.model_default_key("cn"))
    manifest = storage.get_json(keys.model_artifact_manifest_key("cn", "fp32", default["fingerprint"]))
    assert manifest["family"] == "controlnet" and manifest["defaults"]["scheduler"] == "unipc"
    assert "controlnet/openvino_model.xml" in manifest["files"]


def test_a_control_column_is_uploaded_once_and_annotated_once_per_batch(models: dict[str, str], settings: Settings,
                                                                       worker: WorkerProcess, tmp_path: Path) -> None:
    Image.fromarray(_control(3)).save(tmp_path / "edges.png")
    # RGBA and L images are taken, converted to RGB.
    Image.fromarray(_control(4)).convert("RGBA").save(tmp_path / "rgba.png")
    rows = [{"prompt": f"a house number {i}", "control_image": "edges.png", "annotator": "canny"} for i in range(3)]
    rows.append({"prompt": "a plain one", "control_image": "rgba.png", "controlnet_scale": 0.5})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    handle = submit(str(prompts), model="cn", seed=1, settings=settings, **FAST)
    summary = handle.wait(timeout=300)
    assert (summary.done, summary.failed) == (4, 0), summary
    storage = open_storage(settings.storage_url)
    assert len(storage.list_keys("controls/annotated/")) == 1
    assert worker.log_path.read_text().count("annotating control image") == 1
    metas = [read_png_metadata(storage.get_bytes(keys.image_key(handle.batch_id, i))) for i in range(4)]
    assert [m["annotator"] for m in metas] == ["canny"] * 3 + ["none"]
    assert metas[0]["control_image"] == metas[1]["control_image"] != metas[3]["control_image"]
    assert metas[3]["controlnet_scale"] == "0.5" and metas[0]["width"] == "64"
    # The same batch again (another batch id): the cached annotation is used, not recomputed.
    again = submit(str(prompts), model="cn", seed=1, settings=settings, **FAST).wait(timeout=300)
    assert again.done == 4 and worker.log_path.read_text().count("annotating control image") == 1


def test_the_cli_takes_a_control_image_for_every_item(models: dict[str, str], settings: Settings,
                                                      tmp_path: Path) -> None:
    Image.fromarray(_control(5)).convert("L").save(tmp_path / "gray.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    done = run_cli("submit", str(prompts), "--model", "cn", "--control-image", str(tmp_path / "gray.png"),
                   "--steps", "2", "--wait", "--json", settings=settings)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["done"], report["failed"]) == (2, 0)


@pytest.mark.parametrize(("model", "extra", "message"), [
    ("cn", [], "line 1: control_image: model 'cn' is a ControlNet model: give a control image"),
    ("plain", ["--control-image", "{ok}"], "control_image: model 'plain' is a 'sd' model, which takes no control"),
    ("cn", ["--control-image", "{small}"], "is 32x32 but the item asks for 64x64"),
    ("cn", ["--control-image", "{ok}", "--annotator", "sketchy"], "annotator: unknown annotator 'sketchy'"),
    ("cn", ["--control-image", "{missing}"], "control_image: cannot read"),
    ("cn", ["--control-image", "{notimage}"], "is not a readable image"),
    ("cn", ["--control-image", "{deep}"], "is a 16-bit image"),
])
def test_bad_control_inputs_fail_with_one_clear_line(models: dict[str, str], settings: Settings, tmp_path: Path,
                                                     model: str, extra: list[str], message: str) -> None:
    files = {"ok": tmp_path / "ok.png", "small": tmp_path / "small.png", "missing": tmp_path / "missing.png",
             "notimage": tmp_path / "notimage.png", "deep": tmp_path / "deep.png"}
    Image.fromarray(_control(6)).save(files["ok"])
    Image.fromarray(_control(6, 32)).save(files["small"])
    files["notimage"].write_text("not a png")
    Image.fromarray(np.zeros((64, 64), np.uint16)).save(files["deep"])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in extra]
    done = run_cli("submit", str(prompts), "--model", model, "--width", "64", "--height", "64", *args,
                   settings=settings)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_calibration_quantizes_the_controlnet_and_the_unet(models: dict[str, str], settings: Settings) -> None:
    job = calibrate_job("cn", subset_size=3, steps=3, min_speedup=0.0, min_psnr_db=0.0, promote=False)
    outcome = submit_calibrate(job, settings=settings).get(timeout=900)
    assert outcome["status"] == "done", outcome
    storage = open_storage(settings.storage_url)
    prefix = keys.model_artifact_prefix("cn", "int8", outcome["fingerprint"])
    for folder in ("controlnet", "unet"):
        xml = storage.get_bytes(f"{prefix}{folder}/openvino_model.xml").decode()
        assert 'type="FakeQuantize"' in xml, f"{folder} was not quantized"
    assert 'type="FakeQuantize"' not in storage.get_bytes(f"{prefix}text_encoder/openvino_model.xml").decode()
    assert storage.get_json(prefix + "manifest.json")["family"] == "controlnet"
    # The INT8 artifact serves ControlNet jobs.
    handle = submit(["a calibrated house"], model="cn", precision="int8", seed=2, settings=settings,
                    control_image=_save(_control(7), storage_dir(settings)), **FAST)
    summary = handle.wait(timeout=300)
    assert summary.done == 1, summary


def storage_dir(settings: Settings) -> Path:
    return Path(settings.cache_dir).parent


def _save(image: np.ndarray, folder: Path) -> Path:
    path = folder / "control-7.png"
    Image.fromarray(image).save(path)
    return path
