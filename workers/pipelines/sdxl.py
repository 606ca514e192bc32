"""SDXL-class text-to-image (SDXL, SSD-1B) on OpenVINO, from an IR folder in optimum-intel's layout.

What differs from SD 1.x (workers/pipelines/sd.py), as diffusers' StableDiffusionXLPipeline does it:
- two tokenizers and text encoders; the prompt embedding is both encoders' penultimate hidden states side by
  side, and the second encoder's projected pooled output conditions the UNet as `text_embeds`;
- `time_ids` = (original size, crop top-left, target size) = (h, w, 0, 0, h, w);
- an empty negative prompt under guidance is all zeros when the model says `force_zeros_for_empty_prompt`;
- the scheduler starts at index 0 (`set_begin_index(0)`).
The latents, schedulers, denoising loop and decoding are SD 1.x's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.pipelines.sd import CompiledModel, OVStableDiffusion, SDFolder, read_json, tokenize

if TYPE_CHECKING:
    import openvino as ov
    import torch
    from transformers import CLIPTokenizer

ENCODERS = ("text_encoder", "text_encoder_2")


class OVStableDiffusionXL(OVStableDiffusion):
    """A warm SDXL-class pipeline compiled for one (width, height, cfg) shape on one device."""

    def __init__(self, *, tokenizer_2: CLIPTokenizer, text_encoder_2: CompiledModel, force_zeros: bool,
                 penultimate: tuple[str, str], latents_mean: list[float] | None,
                 latents_std: list[float] | None, **base: Any) -> None:
        super().__init__(**base)
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.force_zeros = force_zeros
        self.penultimate = penultimate
        self.latents_mean, self.latents_std = latents_mean, latents_std
        # The same for every image of this compiled shape: one row per item of the UNet's batch.
        self.time_ids = np.asarray([[self.height, self.width, 0, 0, self.height, self.width]] * (2 if self.cfg else 1),
                                   dtype=np.float32)

    @classmethod
    def load(cls, ir_dir: Path, *, device: str = "CPU", width: int, height: int, cfg: bool,
             core: ov.Core | None = None, ov_config: dict[str, str] | None = None) -> OVStableDiffusionXL:
        """Read the IR folder, reshape every model to this static shape, and compile it on `device`."""
        import openvino as ov
        from transformers import CLIPTokenizer

        folder = SDFolder.read(ir_dir, width=width, height=height, cfg=cfg)
        unet_config = folder.unet_config
        if unet_config.get("addition_embed_type") != "text_time" or not (folder.path / "text_encoder_2").is_dir():
            raise ValueError(f"{ir_dir} is not an SDXL-class model (no second text encoder or added conditions)")
        tokenizer_2 = CLIPTokenizer.from_pretrained(folder.path / "tokenizer_2")
        batch, tokens = folder.batch, folder.tokenizer.model_max_length
        pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
        shapes = folder.shapes()
        shapes["text_encoder_2"] = {"input_ids": [batch, tokens]}
        shapes["unet"].update(text_embeds=[batch, pooled], time_ids=[batch, 6])
        models = folder.compile(shapes, core=core if core is not None else ov.Core(), device=device,
                                ov_config=ov_config)
        # hidden_states[-2]: the penultimate layer's output, of num_hidden_layers + 1 hidden states.
        layers = [read_json(folder.path / e / "config.json")["num_hidden_layers"] for e in ENCODERS]
        return cls(**folder.pipeline_args(models, scaling_factor=0.13025), tokenizer_2=tokenizer_2,
                   text_encoder_2=models["text_encoder_2"],
                   force_zeros=bool(folder.index.get("force_zeros_for_empty_prompt", True)),
                   penultimate=(f"hidden_states.{layers[0] - 1}", f"hidden_states.{layers[1] - 1}"),
                   latents_mean=folder.vae_config.get("latents_mean"), latents_std=folder.vae_config.get("latents_std"))

    def _encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt embeddings, pooled embeddings) for [negative, prompt] under CFG, else [prompt]."""
        hidden, pooled = [], None
        for tokenizer, encoder, layer in zip((self.tokenizer, self.tokenizer_2),
                                             (self.text_encoder, self.text_encoder_2), self.penultimate,
                                             strict=True):
            ids = tokenize(tokenizer, prompts).input_ids
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

    def _denoise(self, sched: Any, latents: torch.Tensor, context: Any, **loop: Any) -> torch.Tensor:
        # StableDiffusionXLPipeline sets the begin index (StableDiffusionPipeline does not): the scheduler then
        # starts at the schedule's first entry instead of looking its first timestep up.
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)
        return super()._denoise(sched, latents, context, **loop)

    def _predict_noise(self, sample: np.ndarray, timestep: np.ndarray, context: Any) -> np.ndarray:
        hidden, pooled = context
        return self.unet("out_sample", sample=sample, timestep=timestep, encoder_hidden_states=hidden,
                         text_embeds=pooled, time_ids=self.time_ids)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        import torch

        if self.latents_mean is not None and self.latents_std is not None:
            mean = torch.tensor(self.latents_mean).view(1, -1, 1, 1)
            std = torch.tensor(self.latents_std).view(1, -1, 1, 1)
            # Undone here, so the base class's division by the scaling factor is the only other step.
            latents = latents * std + mean * self.scaling_factor
        return super()._decode(latents)
