"""Stable Diffusion 1.x + ControlNet (a diffusers StableDiffusionControlNetPipeline folder) to OpenVINO IR.

As in OpenVINO's ControlNet notebook, two models change against plain SD 1.x:

    controlnet/openvino_model.{xml,bin}  sample, timestep, encoder_hidden_states, controlnet_cond
                                         -> down_block_res_sample_0..N-1, mid_block_res_sample
    unet/openvino_model.{xml,bin}        sample, timestep, encoder_hidden_states,
                                         down_block_additional_residual_0..N-1, mid_block_additional_residual
                                         -> out_sample

The rest (text encoder, VAE, tokenizer, scheduler, model_index.json) is exactly what workers/convert/sd.py
writes for SD 1.x, in the same optimum-intel-like folder layout, with controlnet/ beside unet/. The
conditioning scale is not baked in: the pipeline multiplies the residuals, as diffusers does inside its
ControlNet. Tracing renames inputs and outputs (`sample.5`, ...); every port is renamed by position here.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

from workers.convert.sd import (
    SOURCE_COMPONENTS,
    TEXT_LENGTH,
    ConversionResult,
    SourceNotFound,
    WeightFormat,
    _convert_text_encoder,
    _convert_vae,
    _export,
    _module,
    check_weight_format,
    conversion_result,
    copy_pipeline_files,
    fingerprint_folders,
    staging,
)

CONVERTER_VERSION = "darkroom-controlnet-ir-1"
FAMILY = "controlnet"


def is_controlnet_source(source_dir: Path) -> bool:
    """A diffusers folder with a single ControlNet (what this module converts)."""
    index_path = Path(source_dir) / "model_index.json"
    if not index_path.is_file():
        return False
    index = json.loads(index_path.read_text(encoding="utf-8"))
    return "controlnet" in index and (Path(source_dir) / "controlnet").is_dir()


def check_controlnet_source(source_dir: Path) -> dict[str, Any]:
    source_dir = Path(source_dir)
    index_path = source_dir / "model_index.json"
    if not index_path.is_file():
        raise SourceNotFound(f"{source_dir} is not a diffusers model folder (no model_index.json)")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    missing = [c for c in (*SOURCE_COMPONENTS, "controlnet") if not (source_dir / c).is_dir()]
    if missing or "text_encoder_2" in index:
        kind = index.get("_class_name", "unknown pipeline")
        why = f"missing {', '.join(missing)}" if missing else "it has a second text encoder (SDXL)"
        raise ValueError(f"{source_dir} ({kind}) is not a Stable Diffusion 1.x ControlNet pipeline: {why}")
    return index


def fingerprint_controlnet_source(source_dir: Path, *, weight_format: str) -> str:
    """16 hex chars identifying what a conversion would produce (SD parts and the ControlNet)."""
    return fingerprint_folders(source_dir, (*SOURCE_COMPONENTS, "controlnet"), version=CONVERTER_VERSION,
                               weight_format=weight_format)


def convert_controlnet(source_dir: Path, out_dir: Path, *, weight_format: WeightFormat = "fp16") -> ConversionResult:
    """Convert a StableDiffusionControlNetPipeline folder to OpenVINO IR in `out_dir` (replacing it)."""
    started = time.perf_counter()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    compress = check_weight_format(weight_format)
    check_controlnet_source(source_dir)
    fingerprint = fingerprint_controlnet_source(source_dir, weight_format=weight_format)
    with staging(out_dir) as work:
        copy_pipeline_files(source_dir, work)
        for convert in (_convert_text_encoder, _convert_vae, _convert_controlnet_and_unet):
            convert(source_dir, work, compress)
            gc.collect()
    return conversion_result(out_dir, FAMILY, fingerprint, started)


def _convert_controlnet_and_unet(source_dir: Path, work: Path, compress: bool) -> None:
    import openvino as ov
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    controlnet = ControlNetModel.from_pretrained(source_dir, subfolder="controlnet", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(source_dir, subfolder="unet", torch_dtype=torch.float32).eval()
    channels, context = unet.config.in_channels, unet.config.cross_attention_dim
    # An odd latent side makes the trace take diffusers' explicit-size upsampling path (see convert.py).
    side = 2**unet.num_upsamplers + 1
    vae_factor = 2 ** (len(json.loads((source_dir / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    sample, timestep = torch.randn(2, channels, side, side), torch.tensor([999.0], dtype=torch.float32)
    states = torch.randn(2, TEXT_LENGTH, context)
    cond = torch.rand(2, 3, side * vae_factor, side * vae_factor)

    def control(sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor,
                cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        down, mid = controlnet(sample, timestep, encoder_hidden_states=states, controlnet_cond=cond,
                               conditioning_scale=1.0, guess_mode=False, return_dict=False)
        return (*down, mid)

    with torch.no_grad():
        residuals = control(sample, timestep, states, cond)
    count = len(residuals) - 1
    down_names = [f"down_block_res_sample_{i}" for i in range(count)]
    shapes = {"sample": ov.PartialShape([-1, channels, -1, -1]), "timestep": ov.PartialShape([-1]),
              "encoder_hidden_states": ov.PartialShape([-1, -1, context]),
              "controlnet_cond": ov.PartialShape([-1, 3, -1, -1])}
    _export(_module(controlnet, control), (sample, timestep, states, cond), shapes,
            (*down_names, "mid_block_res_sample"), work / "controlnet", compress)
    shutil.copyfile(source_dir / "controlnet" / "config.json", work / "controlnet" / "config.json")
    gc.collect()

    def forward(sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor,
                *res: torch.Tensor) -> torch.Tensor:
        return unet(sample, timestep, encoder_hidden_states=states, down_block_additional_residuals=list(res[:-1]),
                    mid_block_additional_residual=res[-1], return_dict=False)[0]

    unet_shapes = {"sample": ov.PartialShape([-1, channels, -1, -1]), "timestep": ov.PartialShape([-1]),
                   "encoder_hidden_states": ov.PartialShape([-1, -1, context])}
    for i, r in enumerate(residuals[:-1]):
        unet_shapes[f"down_block_additional_residual_{i}"] = ov.PartialShape([-1, r.shape[1], -1, -1])
    unet_shapes["mid_block_additional_residual"] = ov.PartialShape([-1, residuals[-1].shape[1], -1, -1])
    _export(_module(unet, forward), (sample, timestep, states, *residuals), unet_shapes, ("out_sample",),
            work / "unet", compress)
    shutil.copyfile(source_dir / "unet" / "config.json", work / "unet" / "config.json")
