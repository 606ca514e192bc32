"""Full-size random-weight SD-1.5-shaped pipelines built from the published configs (no hub here).

Imported by both the project venv (bench/runners.py) and the peers' venv (bench/peers_runner.py): each builds
the folder with its own diffusers and transformers, from the same configs and seeds, so every runner loads a
checkpoint its own library versions wrote. Only the standard library is imported at module level.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# SD-1.5's UNet config (unet/config.json of the published SD-1.5 repo), written out.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
# BK-SDM-small: SD-1.5's UNet without the mid block and with one resnet (+ attention) per down and up stage.
BKSDM_SMALL_UNET: dict[str, Any] = {**SD15_UNET, "mid_block_type": None, "layers_per_block": 1}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512], "act_fn": "silu", "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
}
# A miniature of the same pipeline, for developing the harness in seconds (--models tiny).
TINY_UNET: dict[str, Any] = {
    **SD15_UNET, "sample_size": 8, "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D",
                                                                                       "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "layers_per_block": 1,
}
TINY_VAE: dict[str, Any] = {**SD15_VAE, "sample_size": 64, "layers_per_block": 1, "block_out_channels": [8, 16, 16, 16],
                            "norm_num_groups": 8}
TINY_TEXT: dict[str, Any] = {**SD15_TEXT, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "projection_dim": 32}
MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {"unet": SD15_UNET, "vae": SD15_VAE, "text": SD15_TEXT},
    "bksdm-small": {"unet": BKSDM_SMALL_UNET, "vae": SD15_VAE, "text": SD15_TEXT},
    "tiny": {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT},
}
# SD 1.x's PNDM scheduler config.
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False,
}
TEXT_TOKENS = 77


def build_unet(model: str, seed: int) -> Any:
    """The model's UNet with seeded random weights (also what FlopCounterMode counts)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(3 * seed)
        return UNet2DConditionModel(**MODELS[model]["unet"]).eval()


def build_pipeline_folder(out_dir: Path, model: str, *, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder of `model`'s shape, seeded random weights, CLIP's real tokenizer.

    Returned as it is when `out_dir` already holds a finished one (written next to it, then renamed).
    """
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").is_file():
        return out_dir
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(REPO))
    from workers.demo_model.clip_vocab import clip_tokenizer

    spec = MODELS[model]
    unet = build_unet(model, seed)
    with torch.random.fork_rng():
        torch.manual_seed(3 * seed + 1)
        vae = AutoencoderKL(**spec["vae"])
        torch.manual_seed(3 * seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text"]))
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    pipeline.save_pretrained(partial)
    (partial / "bench-build.json").write_text(json.dumps({"model": model, "seed": seed,
                                                          "weights_checksum": weights_checksum(unet)}))
    partial.rename(out_dir)
    return out_dir


def weights_checksum(module: Any) -> float:
    """A cheap fingerprint of a module's weights: equal in both venvs when they drew the same numbers."""
    import torch

    with torch.no_grad():
        return round(float(sum(p.double().abs().sum() for p in module.parameters())), 3)
