"""Wuerstchen: family detection, conversion and generation through the queue, parity with diffusers, bad inputs.

A tiny random-weight Wuerstchen (prior, four-level decoder, VQGAN, two CLIP text encoders with the real CLIP
tokenizer) is converted by a real `darkroom worker` (fp32) into real S3 storage (SeaweedFS) over its own real
Redis. darkroom's OpenVINO pipeline, with f32 inference, matches diffusers' WuerstchenCombinedPipeline (built
from components loaded from their subfolders, as diffusers 0.42 requires) on the same seed within one uint8 level;
a batch renders through the queue, at the family's default 1024x1024 where it gives no size.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from broker.progress import BatchProgress
from broker.settings import Settings
from darkroom import BatchHandle, submit, submit_convert
from darkroom.submit import send_jobs
from storage import keys
from storage.s3 import S3Storage
from tasks.errors import InvalidRequest
from tasks.schemas import GenerateJob
from testkit.fleet import WorkerProcess, convert_model, run_cli, running_worker
from tests.conftest import REDIS_PASSWORD, exported_env, queue_settings_for, s3_bucket, s3_env
from tests.test_sd_pipeline import max_diff
from workers.pipelines.families import UnknownFamily, check_family, detect_family
from workers.pipelines.png import read_png_metadata

PROMPT = "a dog wearing hat"
NEGATIVE = "blurry, low quality"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
BUCKET = "wuerstchen"
MODEL = "tiny-wuerstchen"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testkit.tiny_models import build_tiny_wuerstchen

    return build_tiny_wuerstchen(tmp_path_factory.mktemp("tiny-wuerstchen") / "combined", seed=0)


@pytest.fixture(scope="module")
def decoder_layout(source: Path) -> Path:
    """The same model as a WuerstchenDecoderPipeline folder with its WuerstchenPriorPipeline in prior/."""
    folder = source.with_name("decoder-with-prior")
    if folder.exists():
        return folder
    index = json.loads((source / "model_index.json").read_text())
    decoder = {"_class_name": "WuerstchenDecoderPipeline", "_diffusers_version": index["_diffusers_version"]}
    prior = {"_class_name": "WuerstchenPriorPipeline", "_diffusers_version": index["_diffusers_version"]}
    for name in ("tokenizer", "text_encoder", "decoder", "scheduler", "vqgan"):
        shutil.copytree(source / name, folder / name)
        decoder[name] = index[name]
    for name in ("tokenizer", "text_encoder", "prior", "scheduler"):
        shutil.copytree(source / f"prior_{name}", folder / "prior" / name)
        prior[name] = index[f"prior_{name}"]
    (folder / "model_index.json").write_text(json.dumps(decoder))
    (folder / "prior" / "model_index.json").write_text(json.dumps(prior))
    return folder


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of this module's own: its queues, results and progress are nobody else's."""
    from broker.embedded import EmbeddedRedis

    server = EmbeddedRedis.start(password=REDIS_PASSWORD, data_dir=tmp_path_factory.mktemp("wuerstchen-redis"))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def s3(s3_server: Any) -> S3Storage:
    return s3_bucket(s3_server, BUCKET, "darkroom")


@pytest.fixture(scope="module")
def env(s3_server: Any) -> Iterator[dict[str, str]]:
    with exported_env(s3_env(s3_server.endpoint)) as values:  # the producer in this process reads S3 too
        yield values


@pytest.fixture(scope="module")
def settings(redis_url: str, s3: S3Storage, env: dict[str, str],
             tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("wuerstchen-queue"), redis_url,
                              storage_url=f"s3://{BUCKET}/darkroom")


@pytest.fixture(scope="module")
def worker(settings: Settings, env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    with running_worker(settings, ["generate.CPU", "convert"], tmp_path_factory, extra_env=env) as process:
        yield process


@pytest.fixture(scope="module")
def converted(worker: WorkerProcess, source: Path, settings: Settings) -> dict[str, Any]:
    return convert_model(settings, source, MODEL, timeout=900)


@pytest.fixture(scope="module")
def artifact(converted: dict[str, Any], s3: S3Storage, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifact as the worker uploaded it, downloaded from S3."""
    target = tmp_path_factory.mktemp("artifact") / "ir"
    s3.download_prefix(keys.model_artifact_prefix(MODEL, "fp32", converted["fingerprint"]), target)
    return target


@pytest.fixture(scope="module")
def reference(source: Path) -> Callable[..., np.ndarray]:
    """diffusers' WuerstchenCombinedPipeline of the source, each component loaded from its subfolder."""
    import torch
    from diffusers import DDPMWuerstchenScheduler, WuerstchenCombinedPipeline
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = WuerstchenCombinedPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(source / "tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(source / "text_encoder"),
        decoder=WuerstchenDiffNeXt.from_pretrained(source / "decoder"),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(source / "scheduler"),
        vqgan=PaellaVQModel.from_pretrained(source / "vqgan"),
        prior_tokenizer=CLIPTokenizer.from_pretrained(source / "prior_tokenizer"),
        prior_text_encoder=CLIPTextModel.from_pretrained(source / "prior_text_encoder"),
        prior_prior=WuerstchenPrior.from_pretrained(source / "prior_prior"),
        prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(source / "prior_scheduler"))
    pipe.set_progress_bar_config(disable=True)

    def run(*, width: int, height: int, guidance: float, prior_guidance: float, negative: str = "",
            prompt: str = PROMPT, seed: int = 7, steps: int = 4, prior_steps: int = 5,
            latents: np.ndarray | None = None) -> np.ndarray:
        image = pipe(prompt, negative_prompt=negative or None, width=width, height=height,
                     prior_num_inference_steps=prior_steps, prior_guidance_scale=prior_guidance,
                     num_inference_steps=steps, decoder_guidance_scale=guidance, output_type="np",
                     latents=None if latents is None else torch.from_numpy(latents),
                     generator=torch.Generator().manual_seed(seed)).images[0]
        return (image * 255).round().astype(np.uint8)

    return run


def test_both_layouts_are_detected_and_a_mismatch_is_named(source: Path, decoder_layout: Path,
                                                            tmp_path: Path) -> None:
    from workers.convert.wuerstchen import source_layout

    assert detect_family(source) == detect_family(decoder_layout) == "wuerstchen"
    with pytest.raises(UnknownFamily, match="family 'sdxl' does not fit.*'wuerstchen' model"):
        check_family(source, "sdxl")
    combined, constants = source_layout(source)
    split, _ = source_layout(decoder_layout)
    assert combined["prior_prior"] == source / "prior_prior" and split["prior_prior"] == decoder_layout / "prior/prior"
    assert constants == {"resolution_multiple": 42.67, "latent_mean": 42.0, "latent_std": 1.0,
                         "latent_dim_scale": 10.67}
    alone = tmp_path / "decoder-alone"
    shutil.copytree(decoder_layout, alone, ignore=shutil.ignore_patterns("prior"))
    with pytest.raises(ValueError, match="WuerstchenDecoderPipeline without its prior: copy the "
                                         "WuerstchenPriorPipeline folder"):
        source_layout(alone)


def test_aa_bicubic_is_torchs_resize() -> None:
    # The decoder's resize, traced as plain arithmetic because OpenVINO converts the torch op wrongly.
    import torch
    import torch.nn.functional as F

    from workers.convert.wuerstchen import aa_bicubic

    for source_side, target in ((3, 16), (3, 2), (24, 256), (24, 16), (7, (3, 5)), (1, 4), (6, 1)):
        size = target if isinstance(target, tuple) else (target, target)
        x = torch.randn(2, 3, source_side, source_side) * 40
        expected = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=True)
        assert torch.allclose(aa_bicubic(x, size), expected, atol=1e-3, rtol=1e-5), (source_side, target)


def test_conversion_writes_the_combined_layout_and_records_the_family(converted: dict[str, Any],
                                                                      artifact: Path) -> None:
    import openvino as ov

    assert converted["family"] == "wuerstchen"
    assert converted["defaults"] == {"width": 1024, "height": 1024, "scheduler": "ddpm-wuerstchen"}
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["family"] == "wuerstchen"
    assert json.loads((artifact / "model_index.json").read_text())["_class_name"] == "WuerstchenCombinedPipeline"
    core = ov.Core()
    expected = {"prior_text_encoder": ["input_ids", "attention_mask"], "text_encoder": ["input_ids", "attention_mask"],
                "prior_prior": ["sample", "timestep_ratio", "encoder_hidden_states"],
                "decoder": ["sample", "timestep_ratio", "effnet", "encoder_hidden_states"], "vqgan": ["latent_sample"]}
    for folder, inputs in expected.items():
        model = core.read_model(artifact / folder / "openvino_model.xml")
        assert [p.get_any_name() for p in model.inputs] == inputs, folder
    for tokenizer in ("prior_tokenizer", "tokenizer"):
        assert (artifact / tokenizer / "tokenizer.json").is_file()


def test_a_decoder_folder_with_its_prior_converts_to_the_same_ir(converted: dict[str, Any], decoder_layout: Path,
                                                                 settings: Settings, s3: S3Storage) -> None:
    outcome = submit_convert(str(decoder_layout), name="tiny-wuerstchen-split", weight_format="fp32",
                             settings=settings).get(timeout=900)
    assert outcome["status"] == "done" and outcome["family"] == "wuerstchen", outcome
    combined = keys.model_artifact_prefix(MODEL, "fp32", converted["fingerprint"])
    split = keys.model_artifact_prefix("tiny-wuerstchen-split", "fp32", outcome["fingerprint"])
    weights = [f"{c}/openvino_model.bin" for c in ("prior_text_encoder", "prior_prior", "text_encoder", "decoder",
                                                   "vqgan")]
    for name in (*weights, "prior_scheduler/scheduler_config.json", "prior_tokenizer/tokenizer.json"):
        assert s3.get_bytes(split + name) == s3.get_bytes(combined + name), name


@pytest.mark.parametrize("width,height,guidance,prior_guidance,negative", [
    (128, 128, 2.0, 4.0, NEGATIVE), (256, 128, 0.0, 4.0, ""), (128, 256, 0.0, 1.0, "")],
    ids=["both-cfg-negative", "prior-cfg-wide", "no-cfg-tall"])
def test_matches_diffusers(width: int, height: int, guidance: float, prior_guidance: float, negative: str,
                           artifact: Path, reference: Callable[..., np.ndarray]) -> None:
    from workers.pipelines.wuerstchen import OVWuerstchen

    pipe = OVWuerstchen.load(artifact, width=width, height=height, cfg=guidance > 1, ov_config=F32,
                             prior_cfg=prior_guidance > 1)
    out = pipe.generate(PROMPT, negative_prompt=negative, steps=4, guidance_scale=guidance, seed=7, prior_steps=5,
                        prior_guidance=prior_guidance)
    expected = reference(width=width, height=height, guidance=guidance, prior_guidance=prior_guidance,
                         negative=negative)
    assert out.image.shape == (height, width, 3)
    # f32 on both sides: the float images differ by about 1e-5, so only rounding ties move a pixel by one level.
    assert max_diff(out.image, expected) <= 1
    assert np.mean(out.image != expected) < 1e-3
    assert out.image.std() > 5  # a real picture, not a flat one that would match anything flat
    # The text steers the picture, so the match above is not one between two images that ignore it.
    other = reference(width=width, height=height, guidance=guidance, prior_guidance=prior_guidance,
                      negative=negative, prompt="a red car on a beach")
    assert max_diff(expected, other) > 10


def test_given_prior_latents_match_diffusers(artifact: Path, reference: Callable[..., np.ndarray]) -> None:
    from workers.pipelines.wuerstchen import OVWuerstchen

    pipe = OVWuerstchen.load(artifact, width=128, height=128, cfg=False, ov_config=F32)
    latents = np.random.default_rng(3).standard_normal(pipe.prior_shape).astype(np.float32)
    out = pipe.generate(PROMPT, steps=3, guidance_scale=0.0, seed=5, prior_steps=4, latents=latents)
    expected = reference(width=128, height=128, guidance=0.0, prior_guidance=4.0, seed=5, steps=3, prior_steps=4,
                         latents=latents)
    assert max_diff(out.image, expected) <= 1
    with pytest.raises(ValueError, match="latents must have the prior's shape"):
        pipe.generate(PROMPT, steps=3, guidance_scale=0.0, seed=5, latents=latents[:, :8])


def test_a_batch_renders_through_the_queue_as_diffusers_does(converted: dict[str, Any], settings: Settings,
                                                            s3: S3Storage,
                                                            reference: Callable[..., np.ndarray]) -> None:
    # The second item gives no size: the family's 1024x1024. No guidance given: diffusers' 0.0 and prior 4.0.
    handle = submit([{"prompt": PROMPT, "seed": 11, "width": 128, "height": 128, "prior_guidance": 2.5},
                     {"prompt": "a red car", "seed": 12}], model=MODEL, steps=2, prior_steps=3,
                    negative_prompt=NEGATIVE, settings=settings)
    summary = handle.wait(timeout=600)
    assert (summary.done, summary.failed) == (2, 0), summary
    for item, side, prior_guidance in ((summary.items[0], 128, 2.5), (summary.items[1], 1024, 4.0)):
        data = s3.get_bytes(keys.image_key(summary.batch_id, item.index))
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # type: ignore[no-untyped-call]
        expected = reference(width=side, height=side, guidance=0.0, prior_guidance=prior_guidance,
                             negative=NEGATIVE, prompt=item.prompt, seed=item.seed, steps=2, prior_steps=3)
        assert max_diff(image, expected) <= 1, item
        meta = read_png_metadata(data)
        assert (meta["model"], meta["scheduler"], meta["width"]) == (MODEL, "ddpm-wuerstchen", str(side))
        assert (meta["steps"], meta["guidance"]) == ("2", "0.0")
        assert (meta["prior_steps"], meta["prior_guidance"]) == ("3", str(prior_guidance))


@pytest.fixture(scope="module")
def sd_model(worker: WorkerProcess, tiny_sd_dir: Path, settings: Settings) -> str:
    convert_model(settings, tiny_sd_dir, "tiny-sd", weight_format="fp16", timeout=900)
    return "tiny-sd"


def test_bad_inputs_fail_at_submit_naming_the_field(converted: dict[str, Any], sd_model: str,
                                                    settings: Settings) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"model": MODEL, "scheduler": "euler"}, "scheduler", "run their own scheduler (ddpm-wuerstchen)"),
        ({"model": MODEL, "width": 1000}, "width", "1000 is not a multiple of 128"),
        ({"model": MODEL, "prior_steps": 0}, "prior_steps", "greater than or equal to 1"),
        ({"model": MODEL, "prior_steps": 500}, "prior_steps", "500 is more than 150"),
        ({"model": MODEL, "prior_guidance": float("nan")}, "prior_guidance", "greater than or equal to 0"),
        ({"model": sd_model, "prior_steps": 10}, "prior_steps", "'sd' model; prior_steps applies to Wuerstchen"),
        ({"model": sd_model, "prior_guidance": 2.0}, "prior_guidance", "applies to Wuerstchen models only"),
    ]
    for options, field, message in cases:
        with pytest.raises(InvalidRequest, match=re.escape(message)) as caught:
            submit([PROMPT], settings=settings, **options)
        assert caught.value.field == field, options
    # Per item, naming the line: a prior field on another family, a size or a scheduler on Wuerstchen.
    for model, item, field in ((sd_model, {"prior_guidance": 3.0}, "prior_guidance"),
                               (MODEL, {"height": 200}, "height"), (MODEL, {"scheduler": "ddim"}, "scheduler")):
        with pytest.raises(InvalidRequest) as caught:
            submit([PROMPT, {"prompt": PROMPT, **item}], model=model, settings=settings)
        assert (caught.value.field, caught.value.line) == (field, 2), caught.value


def test_the_cli_takes_the_prior_flags_and_refuses_them_elsewhere(converted: dict[str, Any], sd_model: str,
                                                                  settings: Settings, env: dict[str, str],
                                                                  s3: S3Storage, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    done = run_cli("submit", str(prompts), "--model", MODEL, "--width", "128", "--height", "128", "--steps", "2",
                   "--prior-steps", "2", "--prior-guidance", "3", "--seed", "4", "--wait", "--json",
                   settings=settings, env=env)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["done"] == 1, summary
    meta = read_png_metadata(s3.get_bytes(keys.image_key(summary["batch_id"], 0)))
    assert (meta["prior_steps"], meta["prior_guidance"], meta["steps"]) == ("2", "3.0", "2")
    wrong = run_cli("submit", str(prompts), "--model", sd_model, "--prior-steps", "5", settings=settings, env=env)
    assert wrong.returncode == 2, wrong.stderr
    assert "prior_steps" in wrong.stderr and "applies to Wuerstchen models only" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_the_worker_refuses_what_the_producer_would_have(converted: dict[str, Any], sd_model: str,
                                                         settings: Settings) -> None:
    """Jobs built by hand (not by submit): the worker knows each artifact's family and names the field."""
    from storage import open_storage
    from tasks.models import resolve_model

    sd = resolve_model(open_storage(settings.storage_url), sd_model)
    jobs = [
        GenerateJob(batch_id="hand-built", index=0, prompt=PROMPT, seed=1, steps=2, guidance=0.0, width=128,
                    height=128, scheduler="euler", model=MODEL, precision="fp32",
                    fingerprint=converted["fingerprint"], family="wuerstchen"),
        GenerateJob(batch_id="hand-built", index=1, prompt=PROMPT, seed=1, steps=2, guidance=7.5, width=64,
                    height=64, scheduler="pndm", model=sd_model, precision=sd.precision, fingerprint=sd.fingerprint,
                    prior_steps=5),
    ]
    BatchProgress(settings.broker_url).start("hand-built", len(jobs), {"model": MODEL})
    send_jobs(jobs, settings, queue="generate.CPU")
    summary = BatchHandle("hand-built", len(jobs), settings).wait(timeout=300)
    assert (summary.done, summary.failed) == (0, 2), summary
    errors = {i.index: i.error or "" for i in summary.items}
    assert "invalid request" in errors[0] and "own scheduler (ddpm-wuerstchen), not 'euler'" in errors[0]
    assert "invalid request" in errors[1] and "prior_steps applies to Wuerstchen models only" in errors[1]


def test_conversion_refuses_a_wrong_family_and_an_incomplete_source(worker: WorkerProcess, settings: Settings,
                                                                    source: Path, decoder_layout: Path,
                                                                    env: dict[str, str], tmp_path: Path,
                                                                    s3: S3Storage) -> None:
    wrong = run_cli("convert", str(source), "--name", "wrong", "--family", "sd", settings=settings, env=env)
    assert wrong.returncode == 2, wrong.stderr
    assert "family 'sd' does not fit" in wrong.stderr and "'wuerstchen' model" in wrong.stderr
    alone = tmp_path / "decoder-alone"
    shutil.copytree(decoder_layout, alone, ignore=shutil.ignore_patterns("prior"))
    missing = run_cli("convert", str(alone), "--name", "alone", settings=settings, env=env)
    assert missing.returncode == 2 and "without its prior" in missing.stderr, missing.stderr
    for done in (wrong, missing):
        assert "Traceback" not in done.stderr
    assert not s3.list_keys(keys.models_prefix() + "wrong/") and not s3.list_keys(keys.models_prefix() + "alone/")
