"""SDXL-class text-to-image (SDXL, SSD-1B) on OpenVINO, from an IR folder in optimum-intel's layout.

What differs from SD 1.x (workers/pipelines/sd.py), as diffusers' StableDiffusionXLPipeline does it:
- two tokenizers and text encoders; the prompt embedding is both encoders' penultimate hidden states side by
  side, and the second encoder's projected pooled output conditions the UNet as `text_embeds`;
- `time_ids` = (original size, crop top-left, target size) = (h, w, 0, 0, h, w);
- an empty negative prompt under guidance is all zeros when the model says `force_zeros_for_empty_prompt`.
The latents, schedulers and decoding are SD 1.x's. No Celery here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.pipelines.sd import OVStableDiffusion, _Model, _read_json, _read_static, read_model_index, step_kwargs

if TYPE_CHECKING:
    import openvino as ov
    import torch
    from transformers import CLIPTokenizer

ENCODERS = ("text_encoder", "text_encoder_2")


class OVStableDiffusionXL(OVStableDiffusion):
    """A warm SDXL-class pipeline compiled for one (width, height, cfg) shape on one device."""

    def __init__(self, *, tokenizer_2: CLIPTokenizer, text_encoder_2: _Model, force_zeros: bool,
                 penultimate: tuple[str, str], latents_mean: list[float] | None,
                 latents_std: list[float] | None, **base: Any) -> None:
        super().__init__(**base)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.force_zeros = force_zeros
        self.penultimate = penultimate
        self.latents_mean, self.latents_std = latents_mean, latents_std

    @classmethod
    def load(cls, ir_dir: Path, *, device: str = "CPU", width: int, height: int, cfg: bool,
             core: ov.Core | None = None, ov_config: dict[str, str] | None = None) -> OVStableDiffusionXL:
        """Read the IR folder, reshape every model to this static shape, and compile it on `device`."""
        import openvino as ov
        from transformers import CLIPTokenizer

        ir_dir = Path(ir_dir)
        index = read_model_index(ir_dir)
        unet_config = _read_json(ir_dir / "unet" / "config.json")
        vae_config = _read_json(ir_dir / "vae_decoder" / "config.json")
        if unet_config.get("addition_embed_type") != "text_time" or not (ir_dir / "text_encoder_2").is_dir():
            raise ValueError(f"{ir_dir} is not an SDXL-class model (no second text encoder or added conditions)")
        scale = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0 or value % scale:
                raise ValueError(f"{name} must be a positive multiple of {scale}, got {value!r}")
        tokenizer = CLIPTokenizer.from_pretrained(ir_dir / "tokenizer")
        tokenizer_2 = CLIPTokenizer.from_pretrained(ir_dir / "tokenizer_2")
        batch, tokens = (2 if cfg else 1), tokenizer.model_max_length
        latent = [unet_config["in_channels"], height // scale, width // scale]
        pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        shapes: dict[str, dict[str, list[int]]] = {
            "text_encoder": {"input_ids": [batch, tokens]},
            "text_encoder_2": {"input_ids": [batch, tokens]},
            "unet": {"sample": [batch, *latent],
                     "encoder_hidden_states": [batch, tokens, unet_config["cross_attention_dim"]],
                     "text_embeds": [batch, pooled], "time_ids": [batch, 6]},
            "vae_decoder": {"latent_sample": [1, *latent]},
        }
        core = core if core is not None else ov.Core()
        config = dict(ov_config or {})
        models = {name: _Model(core.compile_model(_read_static(core, ir_dir / name, shape), device, config))
                  for name, shape in shapes.items()}
        # hidden_states[-2]: the penultimate layer's output, of num_hidden_layers + 1 hidden states.
        layers = [_read_json(ir_dir / e / "config.json")["num_hidden_layers"] for e in ENCODERS]
        return cls(tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler_config=_read_json(
                       ir_dir / "scheduler" / "scheduler_config.json"),
                   text_encoder=models["text_encoder"], text_encoder_2=models["text_encoder_2"],
                   unet=models["unet"], vae_decoder=models["vae_decoder"], width=width, height=height, cfg=cfg,
                   latent_channels=latent[0], vae_scale_factor=scale,
                   scaling_factor=float(vae_config.get("scaling_factor", 0.13025)),
                   cfg_capable=unet_config.get("time_cond_proj_dim") is None,
                   force_zeros=bool(index.get("force_zeros_for_empty_prompt", True)),
                   penultimate=(f"hidden_states.{layers[0] - 1}", f"hidden_states.{layers[1] - 1}"),
                   latents_mean=vae_config.get("latents_mean"), latents_std=vae_config.get("latents_std"))

    def _encode(self, prompts: list[str]) -> Any:  # type: ignore[override]
        """(prompt embeddings, pooled embeddings) for [negative, prompt] under CFG, else [prompt]."""
        hidden, pooled = [], None
        for tokenizer, encoder, layer in zip((self.tokenizer, self.tokenizer_2),
                                             (self.text_encoder, self.text_encoder_2), self.penultimate,
                                             strict=True):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="np").input_ids
            encoder.request.infer({"input_ids": ids.astype(encoder.input_dtype("input_ids"))})
            hidden.append(encoder.request.get_tensor(layer).data.copy())
            if encoder is self.text_encoder_2:
                pooled = encoder.request.get_tensor("text_embeds").data.copy()
        context = np.concatenate(hidden, axis=-1)
        assert pooled is not None
        if len(prompts) == 2 and not prompts[0] and self.force_zeros:
            # diffusers: no negative prompt under guidance means zero embeddings, not the encoded "".
            context[0], pooled[0] = 0.0, 0.0
        return context, pooled

    def _denoise(self, sched: Any, latents: torch.Tensor, context: Any, guidance_scale: float,
                 generator: torch.Generator, cfg: bool) -> torch.Tensor:
        import torch

        hidden, pooled = context
        time_ids = np.asarray([[self.height, self.width, 0, 0, self.height, self.width]] * hidden.shape[0],
                              dtype=np.float32)
        extra = step_kwargs(sched, generator)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        timestep_dtype = self.unet.input_dtype("timestep")
        for t in sched.timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = sched.scale_model_input(model_input, t)
            out = self.unet("out_sample", sample=model_input.numpy(),
                            timestep=np.asarray([t.item()], dtype=timestep_dtype), encoder_hidden_states=hidden,
                            text_embeds=pooled, time_ids=time_ids)
            noise_pred = torch.from_numpy(out)
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = sched.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        return latents

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        import torch

        if self.latents_mean is not None and self.latents_std is not None:
            mean = torch.tensor(self.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(self.latents_std).view(1, -1, 1, 1)
            # Undone here, so the base class's division by the scaling factor is the only other step.
            latents = latents * std + mean * self.scaling_factor
        return super()._decode(latents)
