"""What the demo model is: its text side, AutoencoderKL, UNet and scheduler, and how it is saved.

Training (train.py) builds these and fits the VAE and UNet; the text encoder stays as built (random, frozen).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

# The text encoder's positions are the tokenizer's length: one spelling, the tokenizer's.
from workers.demo_model.clip_vocab import TEXT_LENGTH


def build_text_side(torch_seed: int) -> tuple[Any, Any]:
    """The frozen tiny CLIP text encoder (random weights from `torch_seed`) and CLIP's real tokenizer."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from workers.demo_model.clip_vocab import clip_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(torch_seed)
        encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=TEXT_LENGTH, hidden_act="quick_gelu", projection_dim=64,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    return encoder.eval().requires_grad_(False), clip_tokenizer()


def build_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
        # Four channels per norm group: with one channel per group GroupNorm is an instance norm, which
        # wipes out a flat image's colour (the first run drew every green and blue shape grey).
        block_out_channels=(16, 32, 64, 64), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def build_unet() -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    )


def build_scheduler() -> Any:
    """SD's noise schedule with Euler-ancestral as the model's own sampler.

    The schedule is what the UNet was trained on; the sampler class is only the default a request gets. Euler-a,
    not SD's PNDM: on this model PNDM draws more squares as round blobs (the demo model's README has the
    measurements, held-out seeds and the test's grid, every scheduler)."""
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")


def save_pipeline(out: Path, vae: Any, encoder: Any, tokenizer: Any, unet: Any) -> dict[str, int]:
    """Save the parts as an fp16 StableDiffusionPipeline folder in `out`; returns their parameter counts.

    The modules are cast to fp16 in place: pass copies if training goes on with them."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.to(torch.float16)
    for name in ("vae", "text_encoder", "unet", "tokenizer", "scheduler"):
        shutil.rmtree(out / name, ignore_errors=True)
    pipeline.save_pretrained(out, safe_serialization=True)
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in (("vae", vae), ("text_encoder", encoder), ("unet", unet))}
