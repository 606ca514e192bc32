"""SDXL-class models (SDXL, SSD-1B) from a diffusers folder to OpenVINO IR, in optimum-intel's folder layout.

    model_index.json, scheduler/, tokenizer/, tokenizer_2/
    text_encoder/openvino_model.{xml,bin}    input_ids -> last_hidden_state, pooler_output, hidden_states.0..N
    text_encoder_2/openvino_model.{xml,bin}  input_ids -> text_embeds, last_hidden_state, hidden_states.0..N
    unet/openvino_model.{xml,bin}            sample, timestep, encoder_hidden_states, text_embeds, time_ids
                                             -> out_sample
    vae_decoder/, vae_encoder/               as for SD 1.x

The names are optimum-intel's, so its OVStableDiffusionXLPipeline can load the folder. SDXL takes the
penultimate hidden state of both encoders (concatenated) and the second encoder's projected pooled output.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

from workers.convert.sd import (
    TEXT_LENGTH,
    ConversionResult,
    SourceNotFound,
    WeightFormat,
    _convert_vae,
    _export,
    _module,
    check_weight_format,
    conversion_result,
    copy_pipeline_files,
    fingerprint_folders,
    staging,
)

# Part of every SDXL fingerprint: bump it when the IR this module writes changes.
CONVERTER_VERSION = "darkroom-sdxl-ir-1"
SOURCE_COMPONENTS = ("scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae")


def check_sdxl_source(source_dir: Path) -> dict[str, Any]:
    """The source's model_index.json, if it is an SDXL-class pipeline (both text encoders present)."""
    index_path = Path(source_dir) / "model_index.json"
    if not index_path.is_file():
        raise SourceNotFound(f"{source_dir} is not a diffusers model folder (no model_index.json)")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    missing = [c for c in SOURCE_COMPONENTS if not (Path(source_dir) / c).is_dir()]
    if missing:
        kind = index.get("_class_name", "unknown pipeline")
        raise ValueError(f"{source_dir} ({kind}) is not an SDXL-class model: missing {', '.join(missing)}")
    return index


def fingerprint_sdxl(source_dir: Path, *, weight_format: str) -> str:
    """16 hex chars identifying what a conversion of `source_dir` would produce."""
    return fingerprint_folders(source_dir, SOURCE_COMPONENTS, version=CONVERTER_VERSION, weight_format=weight_format)


def convert_sdxl(source_dir: Path, out_dir: Path, *, weight_format: WeightFormat = "fp16") -> ConversionResult:
    """Convert an SDXL-class diffusers folder to OpenVINO IR in `out_dir` (replacing what is there)."""
    started = time.perf_counter()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    compress = check_weight_format(weight_format)
    check_sdxl_source(source_dir)
    fingerprint = fingerprint_sdxl(source_dir, weight_format=weight_format)
    with staging(out_dir) as work:
        copy_pipeline_files(source_dir, work, ("tokenizer", "tokenizer_2"))
        # One model at a time, each freed before the next (an SDXL UNet is 10 GB in fp32).
        _convert_text_encoder(source_dir, work, "text_encoder", compress)
        gc.collect()
        _convert_text_encoder(source_dir, work, "text_encoder_2", compress)
        gc.collect()
        _convert_unet(source_dir, work, compress)
        gc.collect()
        _convert_vae(source_dir, work, compress)
        gc.collect()
    return conversion_result(out_dir, "sdxl", fingerprint, started)


def _convert_text_encoder(source_dir: Path, work: Path, component: str, compress: bool) -> None:
    import openvino as ov
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    projected = component == "text_encoder_2"
    cls = CLIPTextModelWithProjection if projected else CLIPTextModel
    model = cls.from_pretrained(source_dir / component, dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers

    def forward(input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = model(input_ids=input_ids, output_hidden_states=True)
        first = (out.text_embeds, out.last_hidden_state) if projected else (out.last_hidden_state,
                                                                            out.pooler_output)
        return (*first, *out.hidden_states)

    heads = ("text_embeds", "last_hidden_state") if projected else ("last_hidden_state", "pooler_output")
    outputs = (*heads, *(f"hidden_states.{i}" for i in range(layers + 1)))
    example = (torch.ones((1, TEXT_LENGTH), dtype=torch.int64),)
    _export(_module(model, forward), example, {"input_ids": ov.PartialShape([-1, -1])}, outputs,
            work / component, compress)
    shutil.copyfile(source_dir / component / "config.json", work / component / "config.json")


def _convert_unet(source_dir: Path, work: Path, compress: bool) -> None:
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(source_dir, subfolder="unet", torch_dtype=torch.float32).eval()
    config = unet.config
    if config.addition_embed_type != "text_time":
        raise ValueError(f"{source_dir}: the UNet has no SDXL added conditions "
                         f"(addition_embed_type={config.addition_embed_type!r}, expected 'text_time')")
    channels, context = config.in_channels, config.cross_attention_dim
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim

    def forward(sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor, text_embeds: torch.Tensor,
                time_ids: torch.Tensor) -> torch.Tensor:
        conditions = {"text_embeds": text_embeds, "time_ids": time_ids}
        return unet(sample, timestep, encoder_hidden_states=states, added_cond_kwargs=conditions,
                    return_dict=False)[0]

    # As for SD 1.x: an odd latent side traces the explicit-size upsampling path, which works for every size.
    side = 2**unet.num_upsamplers + 1
    example = (torch.randn(2, channels, side, side), torch.tensor([999.0], dtype=torch.float32),
               torch.randn(2, TEXT_LENGTH, context), torch.randn(2, pooled), torch.randn(2, 6))
    shapes = {"sample": ov.PartialShape([-1, channels, -1, -1]), "timestep": ov.PartialShape([-1]),
              "encoder_hidden_states": ov.PartialShape([-1, -1, context]),
              "text_embeds": ov.PartialShape([-1, pooled]), "time_ids": ov.PartialShape([-1, 6])}
    _export(_module(unet, forward), example, shapes, ("out_sample",), work / "unet", compress)
    shutil.copyfile(source_dir / "unet" / "config.json", work / "unet" / "config.json")
