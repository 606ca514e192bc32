"""Full-size random-weight SD 1.x pipelines for the worker benchmarks (imported by the bench scripts, not run).

No hub here, so the models are built from the published configs: SD-1.5's UNet (or BK-SDM-Small's: no mid block,
one layer per down block), SD's VAE (AutoencoderKL, 83 M parameters) and CLIP ViT-L/14's text encoder (123 M),
with darkroom's CLIP tokenizer and SD-1.5's PNDM scheduler. They are saved as a diffusers folder and converted
by darkroom's own converter (workers/convert/sd.py, FP16 weights), once per work directory: a later run reuses them.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from models import BKSDM_SMALL_UNET, SD15_UNET  # noqa: E402  (bench/models.py: the published configs, written out)

Variant = Literal["sd15", "bksdm-small"]
DEFAULT_WORK = Path("/tmp/darkroom-bench-models")
# SD-1.5's VAE (vae/config.json) and text encoder (CLIP ViT-L/14, text_encoder/config.json).
SD_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32, "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}


def unet_config(variant: Variant) -> dict[str, Any]:
    if variant == "sd15":
        return dict(SD15_UNET)
    if variant == "bksdm-small":
        return dict(BKSDM_SMALL_UNET)
    raise ValueError(f"unknown variant {variant!r}; expected 'sd15' or 'bksdm-small'")


def build_source(out_dir: Path, variant: Variant) -> Path:
    """The diffusers folder (fp32 safetensors), built once."""
    if (out_dir / "model_index.json").exists():
        return out_dir
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from testkit.tiny_models import _save_pipeline
    from workers.demo_model.clip_vocab import clip_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config(variant)).eval()
        vae = AutoencoderKL(**SD_VAE).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
                              set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    _save_pipeline(pipeline, out_dir)
    del pipeline, unet, vae, text_encoder
    gc.collect()
    return out_dir


def fullsize_model(variant: Variant, work: Path = DEFAULT_WORK) -> tuple[Path, Path]:
    """(diffusers source folder, darkroom IR folder) for `variant`, built and converted on first use."""
    from workers.convert.sd import convert_sd

    source = work / variant / "source"
    ir = work / variant / "ir"
    if not (ir / "model_index.json").exists():
        started = time.perf_counter()
        build_source(source, variant)
        built = time.perf_counter() - started
        convert_sd(source, ir, weight_format="fp16")
        gc.collect()
        print(f"{variant}: built in {built:.0f} s, converted in {time.perf_counter() - started - built:.0f} s",
              flush=True)
    return source, ir
