"""The built-in demo model: a short training run that works end to end, the shipped model's score through the
real queue and worker on OpenVINO, and the adherence gate of the calibration lifecycle both ways."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.settings import Settings
from darkroom import submit, submit_convert
from darkroom.calibration import calibrate_job, submit_calibrate
from darkroom.demo_model import shipped_model_dir
from storage import keys, open_storage
from tasks.models import default_of
from testkit.fleet import WorkerProcess, convert_model, run_cli, running_worker
from tests.conftest import queue_settings_for, redis_db_url
from workers.demo_model import shapes
from workers.demo_model.train import TrainConfig, train_demo_model

SHIPPED = "demo-shapes"
TINY_TRAINING = {"seed": 1, "vae_steps": 3, "unet_steps": 4, "scorer_steps": 10, "pool_size": 48}


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("demo-model"), redis_db_url(redis_server, 15))


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    with running_worker(settings, ["generate.CPU", "convert", "calibrate"], tmp_path_factory) as w:
        yield w


@pytest.fixture(scope="module")
def shipped(worker: WorkerProcess, settings: Settings) -> str:
    convert_model(settings, shipped_model_dir(), SHIPPED, timeout=900)
    return SHIPPED


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_a_short_training_run_resumes_exactly_and_renders_through_the_queue(
        tmp_path: Path, worker: WorkerProcess, settings: Settings) -> None:
    # 1. Stopped after 2 UNet steps (checkpoints kept), then resumed to 4: the same weights as 4 in one go.
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    train_demo_model(resumed, TrainConfig(**{**TINY_TRAINING, "unet_steps": 2}, keep_checkpoints=True))
    assert (resumed / "checkpoints" / "unet.pt").is_file()
    record = train_demo_model(resumed, TrainConfig(**TINY_TRAINING))
    train_demo_model(straight, TrainConfig(**TINY_TRAINING))
    assert record["unet"]["steps"] == 4 and record["vae"]["steps"] == 3
    assert not (resumed / "checkpoints").exists()
    assert _weights(resumed) == _weights(straight)
    assert 0.9e6 < record["parameters"]["vae"] < 1.5e6 and 5.5e6 < record["parameters"]["unet"] < 6.2e6
    # 2. A standard diffusers folder, fp16, with the real CLIP tokenizer and the scorer beside it.
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    pipe = StableDiffusionPipeline.from_pretrained(resumed)
    with safe_open(resumed / "unet" / "diffusion_pytorch_model.safetensors", "pt") as stored:
        assert stored.get_tensor(next(iter(stored.keys()))).dtype.__str__() == "torch.float16"
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert (resumed / "scorer" / "model.safetensors").is_file()
    # 3. Converted and rendered by a real worker.
    outcome = submit_convert(str(resumed), name="short-run", settings=settings).get(timeout=900)
    assert outcome["status"] == "done", outcome
    handle = submit(["a red circle", "a blue square"], model="short-run", steps=3, width=64, height=64,
                    settings=settings)
    summary = handle.wait(timeout=300)
    assert summary.done == 2, summary


def test_the_unet_learning_rate_warms_up_holds_then_cools_down_to_zero() -> None:
    from workers.demo_model.train import unet_learning_rate

    config = TrainConfig(unet_steps=1000, unet_cooldown_steps=400, unet_lr=1e-3)
    rates = [unet_learning_rate(config, step) for step in range(1000)]
    assert rates[0] == pytest.approx(1e-3 / 200) and rates[199] == pytest.approx(1e-3)
    assert rates[600] == pytest.approx(1e-3) and rates[800] == pytest.approx(0.5e-3)
    assert rates[999] == pytest.approx(1e-3 / 400)
    assert all(a >= b for a, b in zip(rates[200:-1], rates[201:], strict=True))  # never rises after the warm-up
    constant = TrainConfig(unet_steps=1000, unet_lr=1e-3)
    assert unet_learning_rate(constant, 999) == pytest.approx(1e-3)


@pytest.mark.parametrize("args", [["--unet-cooldown-steps", "100"],
                                  ["--unet-steps", "50", "--unet-cooldown-steps", "100"]])
def test_a_cooldown_needs_a_step_count_it_fits_in(tmp_path: Path, args: list[str]) -> None:
    done = run_cli("train-demo-model", str(tmp_path / "out"), *args)
    assert done.returncode != 0 and "--unet-cooldown-steps" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_unet_trains_on_a_given_vae_which_is_kept_as_it_is(tmp_path: Path) -> None:
    out = tmp_path / "on-shipped-vae"
    config = {**TINY_TRAINING, "vae_steps": None}
    record = train_demo_model(out, TrainConfig(**config, vae_from=str(shipped_model_dir())))
    assert record["vae"]["from"] == str(shipped_model_dir()) and record["vae"]["steps"] == 0
    assert record["vae"]["psnr_db"] > 20  # a trained VAE, not a random one
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (out / vae).read_bytes() == (shipped_model_dir() / vae).read_bytes()
    shipped_scale = json.loads((shipped_model_dir() / "vae" / "config.json").read_text())["scaling_factor"]
    assert record["vae"]["scaling_factor"] == shipped_scale
    assert record["unet"]["steps"] == 4 and not (out / "checkpoints" / "vae.pt").exists()


def test_a_vae_from_without_a_vae_is_refused_before_any_work(tmp_path: Path) -> None:
    for extra in ([], ["--vae-steps", "10"]):
        done = run_cli("train-demo-model", str(tmp_path / "out"), "--vae-from", str(tmp_path), *extra)
        assert done.returncode != 0 and "--vae-from" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert not (tmp_path / "out").exists()


# The request sets no scheduler: the model's own (Euler-a, from its scheduler/ folder) is what a user gets.
# Measured 2026-12-03: 100% (48/48); with PNDM, the sampler it shipped with before, 93.8% (45/48).
def test_the_shipped_model_draws_the_grid_through_the_queue(shipped: str, settings: Settings) -> None:
    from workers.demo_model.batch_score import default_scorer_dir, score_batch

    handle = submit(shapes.grid_prompts(), model=shipped, images_per_prompt=4, steps=20, guidance=6.0,
                    width=64, height=64, seed=2026, settings=settings)
    summary = handle.wait(timeout=900)
    assert summary.done == 48, summary
    result = score_batch(open_storage(settings.storage_url), summary, default_scorer_dir(shipped_model_dir()))
    wrong = [(i["prompt"], i["seen"]) for i in result["items"] if not i["correct"]]
    print(f"shipped model on the 48-image grid: {result['accuracy']}%; wrong: {wrong}")
    assert result["scored"] == 48 and result["accuracy"] >= 95.0, wrong


def test_an_int8_artifact_that_keeps_adherence_is_promoted(shipped: str, settings: Settings) -> None:
    # The gate's own default margin: 2 points of its 480-image set.
    job = calibrate_job(shipped, mode="weights-int8", subset_size=2, steps=3, min_speedup=0.0, min_psnr_db=0.0,
                        promote=True)
    outcome = submit_calibrate(job, settings=settings).get(timeout=900)
    assert outcome["status"] == "done" and outcome["passed"] and outcome["promoted"], json.dumps(outcome)[:3000]
    storage = open_storage(settings.storage_url)
    report = storage.get_json(keys.model_report_key(shipped, "int8", outcome["fingerprint"]))
    adherence = report["adherence"]
    print(f"weights-int8 adherence: FP32 {adherence['fp32']}%, INT8 {adherence['int8']}%")
    assert adherence["fp32"] > 60.0 and adherence["drop"] <= 2.0, adherence  # far above chance (1 in 12)
    assert "adherence INT8" in report["decision"]["reason"]
    prefix = keys.model_artifact_prefix(shipped, "int8", outcome["fingerprint"])
    for sheet in adherence["contact_sheets"].values():
        assert storage.get_bytes(prefix + sheet)[:8] == b"\x89PNG\r\n\x1a\n"
    assert default_of(storage, shipped)["precision"] == "int8"
    shown = run_cli("models", shipped, settings=settings)
    assert f"prompt adherence: FP32 {adherence['fp32']:.1f}%, INT8 {adherence['int8']:.1f}%" in shown.stdout


def test_an_int8_artifact_that_drifts_is_rejected_with_the_reason(shipped: str, settings: Settings) -> None:
    # INT8 activations in the UNet ("hybrid") calibrated on two UNet calls: too few for its activation ranges,
    # so the artifact draws a different picture (measured 2026-12-03: 84.6% against FP32's 99.0%, Euler-a).
    before = default_of(open_storage(settings.storage_url), shipped)
    job = calibrate_job(shipped, mode="hybrid", subset_size=2, steps=3, min_speedup=0.0, min_psnr_db=0.0,
                        promote=True)
    outcome = submit_calibrate(job, settings=settings).get(timeout=900)
    assert outcome["status"] == "done" and not outcome["passed"] and not outcome["promoted"], outcome
    print(f"hybrid INT8, 2 calibration calls: {outcome['reason']}")
    assert "adherence INT8" in outcome["reason"] and "more than the 2.0 allowed" in outcome["reason"]
    storage = open_storage(settings.storage_url)
    adherence = storage.get_json(keys.model_report_key(shipped, "int8", outcome["fingerprint"]))["adherence"]
    assert adherence["fp32"] > 60.0 and adherence["int8"] < adherence["fp32"] - 2.0, adherence
    assert default_of(storage, shipped) == before  # a rejected artifact never becomes the default
