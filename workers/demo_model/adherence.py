"""Prompt adherence of a converted model, FP32 against INT8: the quality gate of the calibration lifecycle.

Used when a model ships a scorer (`scorer/` in its IR folder). Both artifacts render the same fixed prompt
and seed set on OpenVINO; the scorer judges each image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.demo_model.scorer import ShapeClassifier, find_scorer, judge, summarise
from workers.demo_model.shapes import grid_prompts
from workers.pipelines.schedulers import native_scheduler

if TYPE_CHECKING:
    import openvino as ov

# The fixed set: every grid prompt with 40 seeds (480 images), 20 steps, guidance 6, 64x64 (the demo model's size),
# rendered with the model's own scheduler (what its users get by default).
# Why 480: with PNDM a harmless change of arithmetic (bf16 instead of f32) flipped 2-5% of the images, either way.
# On 96 images that noise alone put weights-int8 4.2 points below FP32; on 480 it measured 0.6 points (bf16: 1.0),
# so the default 2-point margin decides on drift, not on noise. With Euler-a, the demo model's scheduler now, bf16
# flips none of the 480; the set stays this size for models whose sampler is as sensitive as PNDM (2026-12-03;
# numbers in the demo model's README, from bench/gate_noise.py).
ADHERENCE_SEEDS = tuple(range(1000, 1040))
ADHERENCE_STEPS = 20
ADHERENCE_GUIDANCE = 6.0


@dataclass(frozen=True)
class AdherenceRun:
    summary: dict[str, Any]
    sheet_png: bytes  # the rendered images, one row per seed

    @property
    def accuracy(self) -> float:
        return float(self.summary["accuracy"] or 0.0)


def adherence_set() -> list[tuple[str, int]]:
    return [(prompt, seed) for seed in ADHERENCE_SEEDS for prompt in grid_prompts()]


def render_and_score(ir_dir: Path, *, scorer_dir: Path, width: int = 64, height: int = 64,
                     ov_config: dict[str, str] | None = None, core: ov.Core | None = None,
                     device: str = "CPU") -> AdherenceRun:
    """Render the fixed set with the IR folder `ir_dir` and score it."""
    from workers.pipelines.sd import OVStableDiffusion

    pipe = OVStableDiffusion.load(Path(ir_dir), device=device, width=width, height=height, cfg=True, core=core,
                                  ov_config=ov_config)
    pairs = adherence_set()
    scheduler = native_scheduler(ir_dir)
    images = [pipe.generate(prompt, steps=ADHERENCE_STEPS, guidance_scale=ADHERENCE_GUIDANCE,
                            scheduler=scheduler, seed=seed).image for prompt, seed in pairs]
    del pipe
    summary = summarise(judge(images, [p for p, _ in pairs], ShapeClassifier(scorer_dir)))
    summary["set"] = {"prompts": grid_prompts(), "seeds": list(ADHERENCE_SEEDS), "steps": ADHERENCE_STEPS,
                      "guidance": ADHERENCE_GUIDANCE, "scheduler": scheduler}
    return AdherenceRun(summary=summary, sheet_png=sheet(images, columns=len(grid_prompts())))


def compare(fp_ir_dir: Path, int8_ir_dir: Path, *, width: int = 64, height: int = 64, core: ov.Core | None = None,
            device: str = "CPU") -> tuple[AdherenceRun, AdherenceRun] | None:
    """(FP32, INT8) adherence when the float artifact ships a scorer; None when it does not."""
    scorer_dir = find_scorer(Path(fp_ir_dir))
    if scorer_dir is None:
        return None
    fp = render_and_score(fp_ir_dir, scorer_dir=scorer_dir, width=width, height=height, core=core, device=device,
                          ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    int8 = render_and_score(int8_ir_dir, scorer_dir=scorer_dir, width=width, height=height, core=core,
                            device=device)
    return fp, int8


def gate(fp_accuracy: float, int8_accuracy: float, max_drop: float) -> tuple[bool, str]:
    """Passed when INT8 adherence is at most `max_drop` points below FP32's; the reason either way."""
    drop = fp_accuracy - int8_accuracy
    text = f"adherence INT8 {int8_accuracy:.1f}% vs FP32 {fp_accuracy:.1f}%"
    if drop > max_drop:
        return False, f"{text}: {drop:.1f} points lower, more than the {max_drop:.1f} allowed"
    return True, f"{text} (drop {max(drop, 0.0):.1f} <= {max_drop:.1f} points)"


def sheet(images: list[np.ndarray], *, columns: int, thumb: int = 64) -> bytes:
    from PIL import Image

    rows = max(1, -(-len(images) // columns))
    canvas = Image.new("RGB", (columns * thumb, rows * thumb), "white")
    for n, image in enumerate(images):
        tile = Image.fromarray(np.asarray(image)[..., :3]).resize((thumb, thumb))
        canvas.paste(tile, ((n % columns) * thumb, (n // columns) * thumb))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
