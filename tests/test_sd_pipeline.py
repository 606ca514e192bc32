"""darkroom's OpenVINO SD pipeline against diffusers' own StableDiffusionPipeline, image for image.

Same tiny random-weight models, same seed, f32 weights and f32 inference: every pixel within 1 of
diffusers' (uint8), for every scheduler a request may name, with and without guidance.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.names import SCHEDULER_NAMES
from workers.convert.sd import convert_sd
from workers.pipelines.schedulers import make_scheduler, native_scheduler
from workers.pipelines.sd import GenerationResult, OVStableDiffusion

PROMPT = "a dog wearing hat"
NEGATIVE = "blurry, low quality"
STEPS = 4
F32 = {"INFERENCE_PRECISION_HINT": "f32"}
VARIANTS = ("sd", "bk-sdm")

PipelineFactory = Callable[..., OVStableDiffusion]


@pytest.fixture(scope="module")
def model_dirs(tiny_sd_dir: Path, tiny_bksdm_dir: Path) -> dict[str, Path]:
    return {"sd": tiny_sd_dir, "bk-sdm": tiny_bksdm_dir}


@pytest.fixture(scope="module")
def ir_dirs(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ir-fp32")
    return {v: convert_sd(src, root / v, weight_format="fp32").out_dir for v, src in model_dirs.items()}


@pytest.fixture(scope="module")
def ov_pipeline(ir_dirs: dict[str, Path]) -> PipelineFactory:
    """Compiled pipelines, each shape compiled once for the module and shared by the tests."""
    import openvino as ov

    core = ov.Core()
    cache: dict[tuple[str, int, int, bool], OVStableDiffusion] = {}

    def get(variant: str, *, cfg: bool, width: int = 64, height: int = 64) -> OVStableDiffusion:
        key = (variant, width, height, cfg)
        if key not in cache:
            cache[key] = OVStableDiffusion.load(ir_dirs[variant], width=width, height=height, cfg=cfg,
                                                core=core, ov_config=F32)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def reference(model_dirs: dict[str, Path]) -> Callable[..., np.ndarray]:
    """diffusers' StableDiffusionPipeline on the same folder, as uint8 the way diffusers makes a PIL image."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipes: dict[str, tuple[Any, dict[str, Any]]] = {}
    for variant, path in model_dirs.items():
        pipe = StableDiffusionPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        # The model's own scheduler config, kept before any swap (another class would drop PNDM's keys).
        pipes[variant] = (pipe, dict(pipe.scheduler.config))

    def run(variant: str, scheduler: str, *, guidance: float, negative: str = "", seed: int = 7,
            width: int = 64, height: int = 64, latents: np.ndarray | None = None) -> np.ndarray:
        pipe, config = pipes[variant]
        pipe.scheduler = make_scheduler(scheduler, config)
        images = pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=STEPS,
                      guidance_scale=guidance, width=width, height=height, output_type="np",
                      generator=torch.Generator().manual_seed(seed),
                      latents=None if latents is None else torch.from_numpy(latents)).images
        return (images[0] * 255).round().astype(np.uint8)

    return run


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("guidance,negative", [(7.5, NEGATIVE), (1.0, "")], ids=["cfg-negative", "no-cfg"])
def test_matches_diffusers(variant: str, scheduler: str, guidance: float, negative: str,
                           ov_pipeline: PipelineFactory, reference: Callable[..., np.ndarray]) -> None:
    expected = reference(variant, scheduler, guidance=guidance, negative=negative)
    pipe = ov_pipeline(variant, cfg=guidance > 1)
    out = pipe.generate(PROMPT, negative_prompt=negative, steps=STEPS, guidance_scale=guidance,
                        scheduler=scheduler, seed=7)
    assert max_diff(out.image, expected) <= 1


def test_matches_diffusers_with_empty_negative_prompt(ov_pipeline: PipelineFactory,
                                                      reference: Callable[..., np.ndarray]) -> None:
    expected = reference("sd", "pndm", guidance=7.5)
    pipe = ov_pipeline("sd", cfg=True)
    out = pipe.generate(PROMPT, steps=STEPS, guidance_scale=7.5, scheduler="pndm", seed=7)
    assert max_diff(out.image, expected) <= 1
    # The negative prompt does reach the image: the comparison above could not pass by ignoring it.
    with_negative = pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5,
                                  scheduler="pndm", seed=7)
    assert max_diff(out.image, with_negative.image) > 5


def test_size_not_a_multiple_of_64_matches_diffusers(ov_pipeline: PipelineFactory,
                                                     reference: Callable[..., np.ndarray]) -> None:
    # 72x80 gives an odd latent side (9), which takes the UNet's explicit-size upsampling path.
    expected = reference("sd", "euler", guidance=7.5, negative=NEGATIVE, width=72, height=80)
    out = ov_pipeline("sd", cfg=True, width=72, height=80).generate(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5, scheduler="euler", seed=7)
    assert out.image.shape == (80, 72, 3)
    assert max_diff(out.image, expected) <= 1


def test_given_latents_match_diffusers(ov_pipeline: PipelineFactory,
                                       reference: Callable[..., np.ndarray]) -> None:
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    expected = reference("sd", "lms", guidance=7.5, negative=NEGATIVE, latents=latents)
    out = ov_pipeline("sd", cfg=True).generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS,
                                               guidance_scale=7.5, scheduler="lms", seed=7, latents=latents)
    assert max_diff(out.image, expected) <= 1


def test_same_seed_same_image_and_different_seed_different_image(ov_pipeline: PipelineFactory) -> None:
    pipe = ov_pipeline("sd", cfg=True)

    def render(seed: int) -> GenerationResult:
        return pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5,
                             scheduler="euler-a", seed=seed)

    first, again, other = render(11), render(11), render(12)
    assert np.array_equal(first.image, again.image)
    assert np.abs(first.image.astype(np.int16) - other.image.astype(np.int16)).mean() > 5
    assert first.image.shape == (64, 64, 3) and first.image.dtype == np.uint8 and first.seed == 11
    assert {"encode", "denoise", "decode", "total"} <= first.timings.keys()


def test_rejects_sizes_that_are_not_multiples_of_8(ir_dirs: dict[str, Path]) -> None:
    for width, height in ((60, 64), (64, 68), (0, 64)):
        with pytest.raises(ValueError, match="multiple of 8"):
            OVStableDiffusion.load(ir_dirs["sd"], width=width, height=height, cfg=False, ov_config=F32)


def test_rejects_a_guidance_the_compiled_batch_cannot_serve(ov_pipeline: PipelineFactory) -> None:
    with pytest.raises(ValueError, match="cfg"):
        ov_pipeline("sd", cfg=False).generate(PROMPT, steps=2, guidance_scale=7.5, scheduler="pndm", seed=1)
    with pytest.raises(ValueError, match="cfg"):
        ov_pipeline("sd", cfg=True).generate(PROMPT, steps=2, guidance_scale=1.0, scheduler="pndm", seed=1)


def test_scheduler_names_map_to_diffusers_schedulers(model_dirs: dict[str, Path]) -> None:
    import json

    config = json.loads((model_dirs["sd"] / "scheduler" / "scheduler_config.json").read_text())
    classes = {name: type(make_scheduler(name, config)).__name__ for name in SCHEDULER_NAMES}
    assert classes == {
        "pndm": "PNDMScheduler", "ddim": "DDIMScheduler", "lms": "LMSDiscreteScheduler",
        "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
        "unipc": "UniPCMultistepScheduler", "dpm++2m": "DPMSolverMultistepScheduler",
    }
    dpm = make_scheduler("dpm++2m", {**config, "algorithm_type": "dpmsolver", "solver_order": 3})
    assert (dpm.config.algorithm_type, dpm.config.solver_order) == ("dpmsolver++", 2)
    # The model's betas carry over to every scheduler.
    assert make_scheduler("euler", config).config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="pndm, ddim, lms"):
        make_scheduler("k-euler", config)
    # PNDM asked of a model that ships another scheduler is SD's PNDM (no Runge-Kutta warm-up), at any step count;
    # a model's own PNDM config keeps its say.
    euler_config = dict(make_scheduler("euler-a", config).config)
    pndm, own = make_scheduler("pndm", euler_config), make_scheduler("pndm", config)
    pndm.set_timesteps(3)
    own.set_timesteps(3)
    assert pndm.config.skip_prk_steps and pndm.timesteps.tolist() == own.timesteps.tolist()
    assert not make_scheduler("pndm", {**config, "skip_prk_steps": False}).config.skip_prk_steps
    # DDIM asked of such a model does not clip latents to an image's range (diffusers' own DDIM default does).
    bare_config = {k: v for k, v in euler_config.items() if k not in ("clip_sample", "set_alpha_to_one")}
    ddim = make_scheduler("ddim", bare_config)
    assert not ddim.config.clip_sample and not ddim.config.set_alpha_to_one
    assert make_scheduler("ddim", {**bare_config, "clip_sample": True}).config.clip_sample


def test_a_model_s_own_scheduler_is_its_default(tmp_path: Path) -> None:
    import json

    # Every name round-trips through the class a diffusers folder saves; an unknown class falls back to SD's PNDM.
    for name in [*SCHEDULER_NAMES, None]:
        class_name = type(make_scheduler(name, {})).__name__ if name else "FlowMatchEulerDiscreteScheduler"
        (tmp_path / "scheduler").mkdir(exist_ok=True)
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": class_name}))
        assert native_scheduler(tmp_path) == (name or "pndm"), class_name
