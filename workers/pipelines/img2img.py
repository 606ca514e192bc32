"""Stable Diffusion 1.x image-to-image on OpenVINO, as diffusers' StableDiffusionImg2ImgPipeline makes it.

The init image goes through the converted VAE encoder (`vae_encoder`: sample -> latent_parameters, the
latent distribution's mean and log-variance); the latent is sampled from that distribution with the item's
generator, scaled, and noised to the schedule's point given by `strength`; denoising runs the remaining
`int(steps * strength)` steps. With f32 weights and inference every pixel is within one uint8 level of
diffusers'. Encoding, denoising and decoding are SD 1.x's (OVStableDiffusion._render); only the start differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.pipelines.interrupt import ShouldStop
from workers.pipelines.sd import CompiledModel, GenerationResult, OVStableDiffusion, compile_static

if TYPE_CHECKING:
    import openvino as ov
    import torch


def img2img_steps(steps: int, strength: float) -> int:
    """The denoising steps an image-to-image request runs: diffusers' int(steps * strength), at most steps."""
    return min(int(steps * strength), steps)


class OVStableDiffusionImg2Img(OVStableDiffusion):
    """The SD 1.x pipeline plus the VAE encoder, compiled for one (width, height, cfg) shape."""

    vae_encoder: CompiledModel

    @classmethod
    def load(cls, ir_dir: Path, *, device: str = "CPU", width: int, height: int, cfg: bool,
             core: ov.Core | None = None, ov_config: dict[str, str] | None = None) -> OVStableDiffusionImg2Img:
        import openvino as ov

        core = core if core is not None else ov.Core()
        pipe = super().load(ir_dir, device=device, width=width, height=height, cfg=cfg, core=core,
                            ov_config=ov_config)
        assert isinstance(pipe, cls)
        pipe.vae_encoder = compile_static(core, Path(ir_dir) / "vae_encoder", {"sample": [1, 3, height, width]},
                                          device, ov_config)
        return pipe

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int, guidance_scale: float,
                 scheduler: str, seed: int, latents: np.ndarray | None = None,
                 init_image: np.ndarray | None = None, strength: float = 0.8,
                 should_stop: ShouldStop = None) -> GenerationResult:
        """One image from `init_image` (uint8, height x width x 3), with generator=manual_seed(seed)."""
        if init_image is None:
            raise ValueError("init_image is required for image-to-image")
        if latents is not None:
            raise ValueError("image-to-image takes its latents from the init image, not from `latents`")
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        if tuple(init_image.shape) != (self.height, self.width, 3) or init_image.dtype != np.uint8:
            raise ValueError(f"init_image must be a {self.width}x{self.height} RGB uint8 image, got shape "
                             f"{tuple(init_image.shape)} {init_image.dtype}")
        if img2img_steps(steps, strength) < 1:
            raise ValueError(f"strength {strength} with {steps} steps leaves no denoising step "
                             f"(int(steps * strength) must be at least 1)")

        def start(sched: Any, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
            # diffusers' get_timesteps: skip the first steps - int(steps * strength) steps of the schedule.
            t_start = (steps - img2img_steps(steps, strength)) * sched.order
            timesteps = sched.timesteps[t_start:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start)
            return self._init_latents(init_image, sched, timesteps[:1], generator), timesteps

        return self._render(prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                            seed=seed, start=start, start_phase="encode_image", should_stop=should_stop)

    def _init_latents(self, init_image: np.ndarray, sched: Any, first: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """diffusers' preprocess, VAE encode, latent_dist.sample(generator), scaling, then add_noise."""
        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        # VaeImageProcessor: [0, 255] -> [0, 1] -> [-1, 1], NCHW float32.
        pixels = (init_image.astype(np.float32) / 255.0) * 2.0 - 1.0
        pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
        parameters = torch.from_numpy(self.vae_encoder("latent_parameters", sample=pixels))
        latents = DiagonalGaussianDistribution(parameters).sample(generator) * self.scaling_factor
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
        return sched.add_noise(latents, noise, first.repeat(latents.shape[0]))


def decode_init_image(data: bytes, *, width: int, height: int) -> np.ndarray:
    """An init image from storage as uint8 RGB of exactly width x height; ValueError naming what is wrong."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"the init image is not a readable image ({exc})".splitlines()[0]) from None
    if rgb.size != (width, height):
        raise ValueError(f"the init image is {rgb.size[0]}x{rgb.size[1]}, the job asks for {width}x{height}")
    return np.asarray(rgb, dtype=np.uint8)
