"""Tiny random-weight models (SD 1.x, SDXL, ControlNet, Wuerstchen) built from configs, for tests and the demo.

These machines reach no model hub, so nothing here downloads: the weights are random (seeded) and the
tokenizer is CLIP's real vocabulary, rebuilt from the BPE file that the `clip-anytorch` package ships.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from workers.demo_model.clip_vocab import TEXT_LENGTH, clip_tokenizer

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

Variant = Literal["sd", "bk-sdm"]


def build_tiny_sd(out_dir: Path, *, seed: int = 0, variant: Variant = "sd") -> Path:
    """A deterministic tiny StableDiffusionPipeline saved with save_pretrained into `out_dir`.

    "bk-sdm" is a BK-SDM-style UNet: no mid block and one layer per block. An `out_dir` that already holds
    a model_index.json is returned as it is.
    """
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    if variant not in ("sd", "bk-sdm"):
        raise ValueError(f"unknown tiny model variant {variant!r}; expected 'sd' or 'bk-sdm'")
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    # 1. Random weights, each component from its own seed; fork_rng leaves the caller's torch RNG as it was.
    with torch.random.fork_rng():
        torch.manual_seed(3 * seed)
        unet = _tiny_unet(bk_sdm=variant == "bk-sdm")
        torch.manual_seed(3 * seed + 1)
        # Four blocks: the real 8x downsampling, so a 64x64 image has an 8x8 latent as in SD.
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
            block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        torch.manual_seed(3 * seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, hidden_act="quick_gelu",
            projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    # 2. SD 1.x's own scheduler configuration.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    # 3. Save next to the target and rename, so a half-written model never looks finished.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipeline.save_pretrained(partial)
    # SD 1.x repos also carry "clip_sample": false, which PNDM does not take but DDIM reads (its default
    # is True): without it a "ddim" request would clip where it does not on a real SD model.
    config_path = partial / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.write_text(json.dumps({**config, "clip_sample": False}, indent=2, sort_keys=True) + "\n",
                           encoding="utf-8")
    partial.rename(out_dir)
    return out_dir


def _tiny_unet(*, bk_sdm: bool) -> UNet2DConditionModel:
    """SD's UNet shape in miniature; BK-SDM drops the mid block and keeps one layer per block."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1 if bk_sdm else 2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type=None if bk_sdm else "UNetMidBlock2DCrossAttn",
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    # Random cross-attention is nearly uniform over the 77 tokens, so the prompt would barely change the
    # image and tests could not tell a dropped negative prompt from rounding. Sharper attention (logits x16)
    # makes the text matter, as it does in a trained model.
    for name, param in unet.named_parameters():
        if ".attn2.to_q." in name or ".attn2.to_k." in name:
            param.data.mul_(4.0)
    return unet


def build_tiny_controlnet(out_dir: Path, *, seed: int = 0) -> Path:
    """A deterministic tiny StableDiffusionControlNetPipeline (the tiny SD model plus a ControlNet).

    The ControlNet starts as `ControlNetModel.from_unet`, whose zero convolutions are zero (the control path
    would do nothing); they are randomised here so that the control image visibly steers the image.
    """
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    import torch
    from diffusers import (
        AutoencoderKL,
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
        UniPCMultistepScheduler,
    )
    from transformers import CLIPTextModel

    sd_dir = build_tiny_sd(out_dir.with_name(out_dir.name + ".sd"), seed=seed)
    sd = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    assert isinstance(sd.vae, AutoencoderKL) and isinstance(sd.text_encoder, CLIPTextModel)
    with torch.random.fork_rng():
        torch.manual_seed(3 * seed + 7)
        # Four embedding blocks: the conditioning embedding downsamples 8x, as the VAE does.
        controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
        for name, param in controlnet.named_parameters():
            zero_conv = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
            if name.startswith(zero_conv):
                param.data.normal_(0.0, 0.3)
            elif name.startswith("controlnet_cond_embedding.") and name.endswith(".weight"):
                # Default init leaves the control image's effect at ~1e-3 of the residuals: make it count.
                param.data.mul_(2.5)
    # UniPC, as OpenVINO's ControlNet notebook uses.
    scheduler = UniPCMultistepScheduler.from_config(sd.scheduler.config)
    pipeline = StableDiffusionControlNetPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet, controlnet=controlnet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipeline.save_pretrained(partial)
    partial.rename(out_dir)
    shutil.rmtree(sd_dir, ignore_errors=True)
    return out_dir


SdxlVariant = Literal["sdxl", "ssd-1b"]
BkSdmSize = Literal["base", "small", "tiny"]


def build_tiny_sdxl(out_dir: Path, *, seed: int = 0, variant: SdxlVariant = "sdxl") -> Path:
    """A deterministic tiny StableDiffusionXLPipeline saved with save_pretrained into `out_dir`.

    Two CLIP text encoders (the second with a projection: the pooled embedding), a UNet with SDXL's added
    conditions (`text_embeds`, `time_ids`), and an 8x VAE. "ssd-1b" is SSD-1B's shape in miniature: the same
    pipeline with a distilled UNet that keeps fewer transformer layers per block, unevenly per layer.
    """
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    if variant not in ("sdxl", "ssd-1b"):
        raise ValueError(f"unknown tiny SDXL variant {variant!r}; expected 'sdxl' or 'ssd-1b'")
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config(hidden: int, layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=TEXT_LENGTH,
                              hidden_act="gelu", projection_dim=32, bos_token_id=49406, eos_token_id=49407,
                              pad_token_id=49407)

    # SDXL's layout: the first block without attention, then blocks with 2 and (in SDXL) 10 transformer layers.
    # SSD-1B keeps the blocks but drops transformer layers: per layer, and differently on the way up.
    layers: dict[str, object] = (
        {"transformer_layers_per_block": (1, 2, 3)} if variant == "sdxl" else
        {"transformer_layers_per_block": ((1, 1), (1, 2), (1, 1)),
         "reverse_transformer_layers_per_block": ((1, 1, 1), (2, 1, 1), (1, 1, 1))})
    with torch.random.fork_rng():
        torch.manual_seed(5 * seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=64, norm_num_groups=8, **layers,
        )
        _sharpen_cross_attention(unet)
        torch.manual_seed(5 * seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
            block_out_channels=(8, 16, 16, 16), norm_num_groups=8, scaling_factor=0.13025,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        torch.manual_seed(5 * seed + 2)
        text_encoder = CLIPTextModel(text_config(32, 2))
        torch.manual_seed(5 * seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(text_config(32, 3))
    # SDXL's own scheduler configuration.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
    )
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0), its first with <|endoftext|>
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    _save_pipeline(pipeline, out_dir)
    return out_dir


def build_tiny_bksdm(out_dir: Path, *, seed: int = 0, size: BkSdmSize = "small") -> Path:
    """A BK-SDM-shaped tiny SD 1.x pipeline: "base" drops the UNet's mid block; "small" also keeps one layer
    per block; "tiny" also drops the innermost down and up blocks. Everything but the UNet is the tiny SD's."""
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    if size not in ("base", "small", "tiny"):
        raise ValueError(f"unknown BK-SDM size {size!r}; expected 'base', 'small' or 'tiny'")
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    sd_dir = build_tiny_sd(out_dir.with_name(out_dir.name + ".sd"), seed=seed)
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    blocks = 3 if size != "tiny" else 2
    with torch.random.fork_rng():
        torch.manual_seed(3 * seed + 11)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64)[:blocks],
            layers_per_block=2 if size == "base" else 1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")[:blocks],
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")[-blocks:],
            mid_block_type=None, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        )
        _sharpen_cross_attention(unet)
    pipe.unet = unet
    pipe.register_modules(unet=unet)
    _save_pipeline(pipe, out_dir)
    shutil.rmtree(sd_dir, ignore_errors=True)
    return out_dir


def _sharpen_cross_attention(unet: UNet2DConditionModel) -> None:
    # As in _tiny_unet: random cross-attention is nearly uniform; sharper logits make the prompt matter.
    for name, param in unet.named_parameters():
        if ".attn2.to_q." in name or ".attn2.to_k." in name:
            param.data.mul_(4.0)


def _save_pipeline(pipeline: object, out_dir: Path) -> None:
    """save_pretrained next to the target, then rename: a half-written model never looks finished."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipeline.save_pretrained(partial)  # type: ignore[attr-defined]
    partial.rename(out_dir)


def build_tiny_wuerstchen(out_dir: Path, *, seed: int = 0) -> Path:
    """A deterministic tiny WuerstchenCombinedPipeline folder: prior_* components and the decoder's, as subfolders.

    What `WuerstchenCombinedPipeline.save_pretrained` writes (diffusers 0.42 cannot load it back whole: load each
    component from its subfolder). The decoder has four levels, like the real one, so its bicubic resizing of the
    prior's embeddings both enlarges and (antialiased) shrinks them. diffusers initialises several Wuerstchen
    weights to zero (output heads, timestep mappers, response norms, VQGAN mixing gains), which would make a random
    model ignore its inputs; they are randomised here. Sizes: multiples of 128 (42.67x prior, 10.67x decoder, 4x VQGAN).
    """
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir
    import torch
    from diffusers import DDPMWuerstchenScheduler, WuerstchenCombinedPipeline
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextConfig, CLIPTextModel

    def text_encoder(hidden: int) -> CLIPTextModel:
        return CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TEXT_LENGTH, hidden_act="gelu", projection_dim=hidden,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))

    with torch.random.fork_rng():
        torch.manual_seed(7 * seed)
        prior = WuerstchenPrior(c_in=16, c=32, c_cond=32, c_r=8, depth=2, nhead=4, dropout=0.0)
        torch.manual_seed(7 * seed + 1)
        decoder = WuerstchenDiffNeXt(
            c_in=4, c_out=4, c_r=8, patch_size=2, c_cond=32, c_hidden=[16, 32, 32, 32], nhead=[-1, 4, 4, 4],
            blocks=[1, 1, 1, 1], level_config=["CT", "CTA", "CTA", "CTA"], inject_effnet=[False, True, True, True],
            effnet_embd=16, clip_embd=24, dropout=0.0)
        torch.manual_seed(7 * seed + 2)
        vqgan = PaellaVQModel(levels=2, bottleneck_blocks=1, embed_dim=16, latent_channels=4, num_vq_embeddings=64)
        torch.manual_seed(7 * seed + 3)
        prior_text_encoder = text_encoder(32)
        torch.manual_seed(7 * seed + 4)
        decoder_text_encoder = text_encoder(24)
        torch.manual_seed(7 * seed + 5)
        for model in (prior, decoder, vqgan):
            for param in model.parameters():
                if not param.data.any():
                    param.data.normal_(0.0, 0.3)
        # Both denoisers' heads predict a shift `a` (first half of the channels) and a scale `b` they divide by:
        # a strong shift makes the text matter, a small scale keeps a random model's steps stable.
        for head in (prior.out[1], decoder.clf[1]):
            half = head.out_channels // 2
            head.weight.data[:half].normal_(0.0, 0.3)
            head.weight.data[half:].normal_(0.0, 0.02)
        for name, param in [*prior.named_parameters(), *decoder.named_parameters()]:
            if ".attention.to_q." in name or ".attention.to_k." in name:
                param.data.mul_(4.0)  # as in _tiny_unet: sharper attention, so the prompt matters
        vqgan.out_block[0].bias.data.fill_(0.5)  # pixels in [0, 1] around mid-grey, as a trained VQGAN's are
    pipeline = WuerstchenCombinedPipeline(
        tokenizer=clip_tokenizer(), text_encoder=decoder_text_encoder, decoder=decoder,
        scheduler=DDPMWuerstchenScheduler(), vqgan=vqgan, prior_tokenizer=clip_tokenizer(),
        prior_text_encoder=prior_text_encoder, prior_prior=prior, prior_scheduler=DDPMWuerstchenScheduler())
    _save_pipeline(pipeline, out_dir)
    return out_dir
