"""Wuerstchen (v2) text-to-image on OpenVINO, from the IR folder workers/convert/wuerstchen.py writes.

Three stages, as diffusers' WuerstchenCombinedPipeline runs them (prior pipeline, then decoder pipeline):
- stage C, the prior: its CLIP text encoder (with the attention mask) conditions a denoiser of small "image
  embeddings" of ceil(side / 42.67) per side, run for `prior_steps` with `prior_guidance`; the result is
  de-normalised as diffusers does (x * latent_mean - latent_std);
- stage B, the decoder: the second text encoder and the embeddings (zeros for the unconditional half under
  guidance) condition a denoiser of VQ latents of int(embedding side * 10.67), for `steps` with `guidance_scale`;
- stage A: the VQGAN decoder turns scale_factor * latents into pixels, clamped to [0, 1].
Both stages use diffusers' own DDPMWuerstchenScheduler and one torch generator, in diffusers' order (prior noise,
each prior step's noise, decoder noise, each decoder step's noise), so the same seed gives the same image.
Guidance is torch.lerp(uncond, text, scale) on [text, uncond] batches, as in diffusers: another op and order than
the SD family's guided_step (workers/pipelines/sd.py), so the loop is Wuerstchen's own.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.families import DEFAULT_PRIOR_GUIDANCE, DEFAULT_PRIOR_STEPS, WUERSTCHEN, WUERSTCHEN_SCHEDULER
from workers.pipelines.interrupt import ShouldStop, check
from workers.pipelines.sd import (
    CompiledModel,
    GenerationResult,
    compile_static,
    given_latents,
    read_json,
    read_model_index,
    require_cfg,
    to_uint8,
    tokenize,
)

if TYPE_CHECKING:
    import openvino as ov
    import torch
    from transformers import CLIPTokenizer

# The only scheduler the family runs; requests name it (or nothing) and PNG metadata records it.
# diffusers' defaults for the sub-pipelines' constants (WuerstchenPriorPipeline, WuerstchenDecoderPipeline), for a
# model_index.json that does not record them (the converter copies them into the IR's from the same table).
PIPELINE_CONSTANTS = {"resolution_multiple": 42.67, "latent_mean": 42.0, "latent_std": 1.0, "latent_dim_scale": 10.67}


class OVWuerstchen:
    """A warm Wuerstchen pipeline for one (width, height, decoder cfg) shape on one device.

    The decoder's batch is fixed by `cfg` (the pool's key); the prior's follows each request's prior guidance, so
    its two shapes are compiled on first use (the default prior guidance, 4.0, is compiled at load).
    """

    family = WUERSTCHEN

    def __init__(self, *, ir_dir: Path, core: ov.Core, device: str, ov_config: dict[str, str], width: int,
                 height: int, cfg: bool, prior_tokenizer: CLIPTokenizer, tokenizer: CLIPTokenizer) -> None:
        self.ir_dir, self.core, self.device, self.ov_config = ir_dir, core, device, ov_config
        self.width, self.height, self.cfg = width, height, cfg
        # `tokenizer` is the prior's: the prompt-length check (workers/generate/prompt_length.py) reads it.
        self.tokenizer, self.decoder_tokenizer = prior_tokenizer, tokenizer
        index = read_model_index(ir_dir)
        self.constants = {k: float(index.get(k, v)) for k, v in PIPELINE_CONSTANTS.items()}
        self.configs = {name: read_json(ir_dir / name / "config.json") for name in ("prior_prior", "decoder", "vqgan")}
        self.scheduler_configs = {name: read_json(ir_dir / name / "scheduler_config.json")
                                  for name in ("prior_scheduler", "scheduler")}
        vq = self.configs["vqgan"]
        vq_scale = vq.get("up_down_scale_factor", 2) * 2 ** (vq.get("levels", 2) - 1)
        decoder = self.configs["decoder"]
        multiple = decoder.get("patch_size", 2) * 2 ** (len(decoder.get("c_hidden", [0] * 4)) - 1)
        sides = [stage_sides(value, self.constants, vq_scale, multiple, name)
                 for name, value in (("height", height), ("width", width))]
        self.prior_shape = (1, self.configs["prior_prior"]["c_in"], sides[0][0], sides[1][0])
        self.latent_shape = (1, decoder.get("c_in", 4), sides[0][1], sides[1][1])
        self._models: dict[tuple[str, int], CompiledModel] = {}
        self._lock = threading.Lock()  # infer requests are not thread-safe; a threaded pool may share this
        # The per-step model of the image stage is `unet`, as in the other families (fault injection wraps it).
        self.unet = self._model("decoder", 2 if cfg else 1)

    @classmethod
    def load(cls, ir_dir: Path, *, device: str = "CPU", width: int, height: int, cfg: bool,
             core: ov.Core | None = None, ov_config: dict[str, str] | None = None,
             prior_cfg: bool = True) -> OVWuerstchen:
        """Read the IR folder and compile every model for this static shape on `device`."""
        import openvino as ov
        from transformers import CLIPTokenizer

        ir_dir = Path(ir_dir)
        if read_model_index(ir_dir).get("_class_name") != "WuerstchenCombinedPipeline":
            raise ValueError(f"{ir_dir} is not a converted Wuerstchen model (model_index.json is not a "
                             "WuerstchenCombinedPipeline)")
        pipe = cls(ir_dir=ir_dir, core=core if core is not None else ov.Core(), device=device,
                   ov_config=dict(ov_config or {}), width=width, height=height, cfg=cfg,
                   prior_tokenizer=CLIPTokenizer.from_pretrained(ir_dir / "prior_tokenizer"),
                   tokenizer=CLIPTokenizer.from_pretrained(ir_dir / "tokenizer"))
        for name, batch in (("prior_text_encoder", 2 if prior_cfg else 1), ("prior_prior", 2 if prior_cfg else 1),
                            ("text_encoder", 2 if cfg else 1), ("vqgan", 1)):
            pipe._model(name, batch)
        return pipe

    def _model(self, name: str, batch: int) -> CompiledModel:
        """The model compiled for this batch: compiled once, on first use."""
        key = (name, batch)
        if key not in self._models:
            self._models[key] = compile_static(self.core, self.ir_dir / name, self._shapes(name, batch), self.device,
                                               self.ov_config)
        return self._models[key]

    def _shapes(self, name: str, batch: int) -> dict[str, list[int]]:
        tokens = (self.tokenizer if name.startswith("prior") else self.decoder_tokenizer).model_max_length
        _, embedding, prior_h, prior_w = self.prior_shape
        if name in ("prior_text_encoder", "text_encoder"):
            return {"input_ids": [batch, tokens], "attention_mask": [batch, tokens]}
        if name == "prior_prior":
            return {"sample": [batch, *self.prior_shape[1:]], "timestep_ratio": [batch],
                    "encoder_hidden_states": [batch, tokens, self.configs["prior_prior"]["c_cond"]]}
        if name == "decoder":
            return {"sample": [batch, *self.latent_shape[1:]], "timestep_ratio": [batch],
                    "effnet": [batch, embedding, prior_h, prior_w],
                    "encoder_hidden_states": [batch, tokens, self.configs["decoder"]["clip_embd"]]}
        return {"latent_sample": [1, self.configs["vqgan"].get("latent_channels", 4), *self.latent_shape[2:]]}

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int, guidance_scale: float,
                 scheduler: str = WUERSTCHEN_SCHEDULER, seed: int, prior_steps: int = DEFAULT_PRIOR_STEPS,
                 prior_guidance: float = DEFAULT_PRIOR_GUIDANCE, latents: np.ndarray | None = None,
                 should_stop: ShouldStop = None) -> GenerationResult:
        """One image, as WuerstchenCombinedPipeline makes it with generator=manual_seed(seed).

        `steps`/`guidance_scale` are the decoder's (diffusers: num_inference_steps, decoder_guidance_scale);
        `latents`, like diffusers' `latents`, replaces the prior's initial noise.
        """
        import torch
        from diffusers import DDPMWuerstchenScheduler

        if scheduler != WUERSTCHEN_SCHEDULER:
            raise ValueError(f"Wuerstchen models run their own scheduler ({WUERSTCHEN_SCHEDULER}), not {scheduler!r}")
        cfg, prior_cfg = guidance_scale > 1.0, prior_guidance > 1.0  # diffusers' do_classifier_free_guidance
        require_cfg(self.cfg, cfg, guidance_scale)
        for name, value in (("steps", steps), ("prior_steps", prior_steps)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        with self._lock, torch.inference_mode():
            clock = _Clock()
            prompts = [prompt, negative_prompt]  # [text, uncond]: diffusers' order for both stages
            prior_context = self._encode(self.tokenizer, "prior_text_encoder", prompts[: 2 if prior_cfg else 1])
            context = self._encode(self.decoder_tokenizer, "text_encoder", prompts[: 2 if cfg else 1])
            clock.lap("encode")
            generator = torch.Generator("cpu").manual_seed(seed)
            # Stage C: image embeddings from text.
            sched = DDPMWuerstchenScheduler.from_config(self.scheduler_configs["prior_scheduler"])
            sched.set_timesteps(prior_steps)
            if latents is None:
                noise = torch.randn(self.prior_shape, generator=generator, dtype=torch.float32)
            else:
                noise = given_latents(latents, self.prior_shape, "the prior's shape")
            sample = self._denoise(self._model("prior_prior", 2 if prior_cfg else 1), sched,
                                   noise * sched.init_noise_sigma, prior_guidance, prior_cfg, generator, should_stop,
                                   encoder_hidden_states=prior_context)
            embeddings = sample * self.constants["latent_mean"] - self.constants["latent_std"]
            clock.lap("prior")
            # Stage B: VQ latents from the embeddings and the text; no embeddings for the unconditional half.
            effnet = torch.cat([embeddings, torch.zeros_like(embeddings)]) if cfg else embeddings
            sched = DDPMWuerstchenScheduler.from_config(self.scheduler_configs["scheduler"])
            sched.set_timesteps(steps)
            noise = torch.randn(self.latent_shape, generator=generator, dtype=torch.float32)
            sample = self._denoise(self.unet, sched, noise * sched.init_noise_sigma, guidance_scale, cfg, generator,
                                   should_stop, effnet=effnet.numpy(), encoder_hidden_states=context)
            clock.lap("denoise")  # the decoder's steps: what the step-time metric divides by `steps`
            # Stage A: pixels.
            image = self._decode(sample)
            clock.lap("decode")
        return GenerationResult(image=image, seed=seed, timings=clock.total())

    def _encode(self, tokenizer: CLIPTokenizer, name: str, prompts: list[str]) -> np.ndarray:
        encoded = tokenize(tokenizer, prompts)
        model = self._model(name, len(prompts))
        return model("last_hidden_state", input_ids=encoded.input_ids.astype(model.input_dtype("input_ids")),
                     attention_mask=encoded.attention_mask.astype(model.input_dtype("attention_mask")))

    @staticmethod
    def _denoise(model: Any, sched: Any, latents: torch.Tensor, guidance: float, cfg: bool,
                 generator: torch.Generator, should_stop: ShouldStop, **conditions: np.ndarray) -> torch.Tensor:
        """diffusers' loop of either stage: every timestep but the last (0), the ratio as a batch-sized input."""
        import torch

        for t in sched.timesteps[:-1]:
            check(should_stop)
            ratio = t.expand(latents.size(0)).to(latents.dtype)
            sample, ratios = (torch.cat([latents] * 2), torch.cat([ratio] * 2)) if cfg else (latents, ratio)
            predicted = torch.from_numpy(model("out_sample", sample=sample.numpy(), timestep_ratio=ratios.numpy(),
                                               **conditions))
            if cfg:
                text, uncond = predicted.chunk(2)
                predicted = torch.lerp(uncond, text, guidance)
            latents = sched.step(predicted, ratio, latents, generator=generator, return_dict=False)[0]
        return latents

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        import torch

        scaled = (latents * self.configs["vqgan"].get("scale_factor", 0.3764)).numpy()
        decoded = torch.from_numpy(self._model("vqgan", 1)("sample", latent_sample=scaled))
        # The VQGAN decodes to [0, 1] already: diffusers post-processes it without denormalizing.
        return to_uint8(decoded)


class _Clock:
    """Seconds per phase of one image (GenerationResult.timings, and the worker's metrics)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase], self._mark = now - self._mark, now

    def total(self) -> dict[str, float]:
        self.timings["total"] = time.perf_counter() - self._start
        return self.timings


def stage_sides(side: int, constants: dict[str, float], vq_scale: int, multiple: int, name: str) -> tuple[int, int]:
    """(prior side, decoder latent side) for an image side, as diffusers computes them; ValueError naming the
    field when the stages would render another size than asked (the decoder's latent must also split evenly
    into its levels). For the released Wuerstchen every multiple of 128 works, e.g. 1024 -> 24 -> 256 -> 1024."""
    if not isinstance(side, int) or isinstance(side, bool) or side <= 0:
        raise ValueError(f"{name} must be a positive integer, got {side!r}")
    prior = math.ceil(side / constants["resolution_multiple"])
    latent = int(prior * constants["latent_dim_scale"])
    if latent * vq_scale != side or latent % multiple:
        raise ValueError(f"{name} {side} does not fit Wuerstchen's stages (it would render {latent * vq_scale} "
                         "pixels); use a multiple of 128, such as 1024")
    return prior, latent
