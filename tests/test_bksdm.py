"""Distilled SD 1.x UNets (BK-SDM base, small, tiny) on the SD 1.x path: build, convert, match diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from workers.pipelines.families import detect_family

SIZES = ("base", "small", "tiny")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    from testkit.tiny_models import build_tiny_bksdm
    from workers.convert.sd import convert_sd

    root = tmp_path_factory.mktemp("bksdm")
    out = {}
    for size in SIZES:
        source = build_tiny_bksdm(root / size, seed=0, size=size)  # type: ignore[arg-type]
        out[size] = (source, convert_sd(source, root / f"ir-{size}", weight_format="fp32").out_dir)
    return out


def test_the_shapes_are_bk_sdm_s(models: dict[str, tuple[Path, Path]]) -> None:
    configs = {s: json.loads((src / "unet" / "config.json").read_text()) for s, (src, _) in models.items()}
    assert all(c["mid_block_type"] is None for c in configs.values())
    assert (configs["base"]["layers_per_block"], configs["small"]["layers_per_block"]) == (2, 1)
    assert len(configs["tiny"]["down_block_types"]) == len(configs["small"]["down_block_types"]) - 1
    assert all(detect_family(src) == "sd" for src, _ in models.values())


@pytest.mark.parametrize("size", SIZES)
def test_matches_diffusers(size: str, models: dict[str, tuple[Path, Path]]) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from workers.pipelines.sd import OVStableDiffusion

    source, ir = models[size]
    pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a dog wearing hat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5,
                    width=64, height=64, output_type="np", generator=torch.Generator().manual_seed(7)).images[0]
    expected = (expected * 255).round().astype(np.uint8)
    out = OVStableDiffusion.load(ir, width=64, height=64, cfg=True,
                                 ov_config={"INFERENCE_PRECISION_HINT": "f32"}).generate(
        "a dog wearing hat", negative_prompt="blurry", steps=4, guidance_scale=7.5, scheduler="pndm", seed=7)
    assert int(np.abs(out.image.astype(np.int16) - expected.astype(np.int16)).max()) <= 1
    assert out.image.std() > 5
