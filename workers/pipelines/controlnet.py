"""Stable Diffusion 1.x with a ControlNet on OpenVINO, from an IR folder written by workers/convert/controlnet.py.

Each denoising step runs the ControlNet on (latents, timestep, prompt embeddings, control image), scales its
residuals by `controlnet_scale`, and feeds them to the UNet, exactly as diffusers'
StableDiffusionControlNetPipeline does (guess_mode off, control guidance over all steps). With f32 weights and
f32 inference every pixel is within one uint8 level of diffusers on the same latents and control image.
No Celery here.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.pipelines.sd import (
    GenerationResult,
    OVStableDiffusion,
    _Model,
    _read_json,
    _read_static,
    read_model_index,
    step_kwargs,
)

if TYPE_CHECKING:
    import openvino as ov
    import torch


def is_controlnet_ir(ir_dir: Path) -> bool:
    return (Path(ir_dir) / "controlnet" / "openvino_model.xml").is_file()


def procedural_control(width: int, height: int, *, seed: int = 0) -> np.ndarray:
    """A synthetic control image (white shapes on black, like an edge map): for calibration without data."""
    import cv2

    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.uint8)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        radius = int(rng.integers(max(2, min(width, height) // 16), max(3, min(width, height) // 3)))
        cv2.circle(image, (x, y), radius, (255, 255, 255), 1 + int(rng.integers(0, 3)))
        x2, y2 = int(rng.integers(0, width)), int(rng.integers(0, height))
        cv2.line(image, (x, y), (x2, y2), (255, 255, 255), 1)
    return image


class OVControlNetPipeline(OVStableDiffusion):
    """A warm SD 1.x + ControlNet pipeline compiled for one (width, height, cfg) shape on one device."""

    family = "controlnet"

    def __init__(self, *, controlnet: _Model, residual_names: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.controlnet = controlnet
        self.residual_names = residual_names  # the ControlNet's outputs, in the UNet's input order
        # Used when a call gives no control image: only calibration and measurement set it; a job never does.
        self.fallback_control: np.ndarray | None = None
        self._call_lock = threading.RLock()
        self._control: np.ndarray | None = None
        self._scale = 1.0

    @classmethod
    def load(cls, ir_dir: Path, *, device: str = "CPU", width: int, height: int, cfg: bool,
             core: ov.Core | None = None, ov_config: dict[str, str] | None = None) -> OVControlNetPipeline:
        import openvino as ov
        from transformers import CLIPTokenizer

        ir_dir = Path(ir_dir)
        read_model_index(ir_dir)
        if not is_controlnet_ir(ir_dir):
            raise FileNotFoundError(f"{ir_dir} is not a converted ControlNet model: no controlnet/openvino_model.xml")
        unet_config = _read_json(ir_dir / "unet" / "config.json")
        vae_config = _read_json(ir_dir / "vae_decoder" / "config.json")
        scale = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0 or value % scale:
                raise ValueError(f"{name} must be a positive multiple of {scale}, got {value!r}")
        tokenizer = CLIPTokenizer.from_pretrained(ir_dir / "tokenizer")
        batch, tokens = (2 if cfg else 1), tokenizer.model_max_length
        latent = [unet_config["in_channels"], height // scale, width // scale]
        states = [batch, tokens, unet_config["cross_attention_dim"]]
        core = core if core is not None else ov.Core()
        config = dict(ov_config or {})
        # 1. The ControlNet at its static shape; its output shapes are the UNet's residual input shapes.
        control_model = _read_static(core, ir_dir / "controlnet", {
            "sample": [batch, *latent], "encoder_hidden_states": states, "controlnet_cond": [batch, 3, height, width]})
        residual_names = tuple(port.get_any_name() for port in control_model.outputs)
        unet_shapes = {"sample": [batch, *latent], "encoder_hidden_states": states}
        for port, name in zip(control_model.outputs, _unet_residual_inputs(len(residual_names)), strict=True):
            unet_shapes[name] = list(port.get_shape())
        models = {
            "controlnet": control_model,
            "unet": _read_static(core, ir_dir / "unet", unet_shapes),
            "text_encoder": _read_static(core, ir_dir / "text_encoder", {"input_ids": [batch, tokens]}),
            "vae_decoder": _read_static(core, ir_dir / "vae_decoder", {"latent_sample": [1, *latent]}),
        }
        compiled = {name: _Model(core.compile_model(model, device, config)) for name, model in models.items()}
        return cls(controlnet=compiled["controlnet"], residual_names=residual_names, tokenizer=tokenizer,
                   scheduler_config=_read_json(ir_dir / "scheduler" / "scheduler_config.json"),
                   text_encoder=compiled["text_encoder"], unet=compiled["unet"], vae_decoder=compiled["vae_decoder"],
                   width=width, height=height, cfg=cfg, latent_channels=latent[0], vae_scale_factor=scale,
                   scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
                   cfg_capable=unet_config.get("time_cond_proj_dim") is None)

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int, guidance_scale: float,
                 scheduler: str, seed: int, latents: np.ndarray | None = None,
                 control_image: np.ndarray | None = None, controlnet_scale: float = 1.0) -> GenerationResult:
        """One image, as diffusers' StableDiffusionControlNetPipeline makes it with the same seed and image.

        `control_image` is uint8 height x width x 3 (RGB) at exactly the pipeline's size.
        """
        if control_image is None:
            control_image = self.fallback_control
        if control_image is None:
            raise ValueError("a ControlNet model needs a control image")
        control = np.asarray(control_image)
        expected = (self.height, self.width, 3)
        if control.shape != expected or control.dtype != np.uint8:
            raise ValueError(f"the control image must be {self.width}x{self.height} RGB uint8 "
                             f"(shape {expected}), got shape {control.shape} {control.dtype}")
        with self._call_lock:
            # diffusers' control image processor: RGB, [0, 1] floats (no normalisation), NCHW.
            self._control = np.ascontiguousarray((control.astype(np.float32) / 255.0).transpose(2, 0, 1)[None])
            self._scale = float(controlnet_scale)
            try:
                return super().generate(prompt, negative_prompt=negative_prompt, steps=steps,
                                        guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, latents=latents)
            finally:
                self._control = None

    def _denoise(self, sched: Any, latents: torch.Tensor, context: np.ndarray, guidance_scale: float,
                 generator: torch.Generator, cfg: bool) -> torch.Tensor:
        import torch

        assert self._control is not None
        control = np.concatenate([self._control] * 2) if cfg else self._control
        extra = step_kwargs(sched, generator)
        timestep_dtype = self.unet.input_dtype("timestep")
        residual_inputs = _unet_residual_inputs(len(self.residual_names))
        for t in sched.timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = sched.scale_model_input(model_input, t)
            timestep = np.asarray([t.item()], dtype=timestep_dtype)
            sample = model_input.numpy()
            # Called as a _Model (so calibration's recorder can stand in for it), then every output read.
            self.controlnet(self.residual_names[0], sample=sample, timestep=timestep, encoder_hidden_states=context,
                            controlnet_cond=control)
            request = getattr(self.controlnet, "model", self.controlnet).request
            # diffusers multiplies each residual by the conditioning scale inside the ControlNet (in torch).
            residuals = {name: (torch.from_numpy(request.get_tensor(out).data.copy()) * self._scale).numpy()
                         for out, name in zip(self.residual_names, residual_inputs, strict=True)}
            out = self.unet("out_sample", sample=sample, timestep=timestep, encoder_hidden_states=context,
                            **residuals)
            noise_pred = torch.from_numpy(out)
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = sched.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        return latents


def _unet_residual_inputs(count: int) -> tuple[str, ...]:
    return (*(f"down_block_additional_residual_{i}" for i in range(count - 1)), "mid_block_additional_residual")
