"""Stable Diffusion 1.x with a ControlNet on OpenVINO, from an IR folder written by workers/convert/controlnet.py.

Each denoising step runs the ControlNet on (latents, timestep, prompt embeddings, control image), scales its
residuals by `controlnet_scale`, and feeds them to the UNet, exactly as diffusers'
StableDiffusionControlNetPipeline does (guess_mode off, control guidance over all steps). With f32 weights and
f32 inference every pixel is within one uint8 level of diffusers on the same latents and control image.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.pipelines.interrupt import ShouldStop
from workers.pipelines.sd import CompiledModel, GenerationResult, OVStableDiffusion, SDFolder, read_static

if TYPE_CHECKING:
    import openvino as ov


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

    def __init__(self, *, controlnet: CompiledModel, residual_names: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.controlnet = controlnet
        self.residual_names = residual_names  # the ControlNet's outputs, in the UNet's input order
        self.residual_inputs = _unet_residual_inputs(len(residual_names))
        # Used when a call gives no control image: only calibration and measurement set it; a job never does.
        self.fallback_control: np.ndarray | None = None
        self._call_lock = threading.RLock()
        self._control: np.ndarray | None = None
        self._scale = 1.0

    @classmethod
    def load(cls, ir_dir: Path, *, device: str = "CPU", width: int, height: int, cfg: bool,
             core: ov.Core | None = None, ov_config: dict[str, str] | None = None) -> OVControlNetPipeline:
        import openvino as ov

        folder = SDFolder.read(ir_dir, width=width, height=height, cfg=cfg)
        if not is_controlnet_ir(folder.path):
            raise FileNotFoundError(f"{ir_dir} is not a converted ControlNet model: no controlnet/openvino_model.xml")
        core = core if core is not None else ov.Core()
        shapes = folder.shapes()
        # 1. The ControlNet at its static shape (the UNet's inputs and the control image); its output shapes are
        #    the UNet's residual input shapes.
        control_model = read_static(core, folder.path / "controlnet",
                                    {**shapes["unet"], "controlnet_cond": [folder.batch, 3, height, width]})
        residual_names = tuple(port.get_any_name() for port in control_model.outputs)
        for port, name in zip(control_model.outputs, _unet_residual_inputs(len(residual_names)), strict=True):
            shapes["unet"][name] = list(port.get_shape())
        # 2. Every model compiled.
        controlnet = CompiledModel(core.compile_model(control_model, device, dict(ov_config or {})))
        models = folder.compile(shapes, core=core, device=device, ov_config=ov_config)
        return cls(controlnet=controlnet, residual_names=residual_names, **folder.pipeline_args(models))

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int, guidance_scale: float,
                 scheduler: str, seed: int, latents: np.ndarray | None = None,
                 control_image: np.ndarray | None = None, controlnet_scale: float = 1.0,
                 should_stop: ShouldStop = None) -> GenerationResult:
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
            # diffusers' control image processor: RGB, [0, 1] floats (no normalisation), NCHW; under CFG both
            # halves of the batch get it (a request whose guidance does not fit the compiled batch is refused).
            image = np.ascontiguousarray((control.astype(np.float32) / 255.0).transpose(2, 0, 1)[None])
            self._control = np.concatenate([image] * 2) if self.cfg else image
            self._scale = float(controlnet_scale)
            try:
                return super().generate(prompt, negative_prompt=negative_prompt, steps=steps,
                                        guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, latents=latents,
                                        should_stop=should_stop)
            finally:
                self._control = None

    def _predict_noise(self, sample: np.ndarray, timestep: np.ndarray, context: Any) -> np.ndarray:
        import torch

        assert self._control is not None
        # Called as a CompiledModel (so calibration's recorder can stand in for it), then every output read.
        self.controlnet(self.residual_names[0], sample=sample, timestep=timestep, encoder_hidden_states=context,
                        controlnet_cond=self._control)
        request = getattr(self.controlnet, "model", self.controlnet).request
        # diffusers multiplies each residual by the conditioning scale inside the ControlNet (in torch).
        residuals = {name: (torch.from_numpy(request.get_tensor(out).data.copy()) * self._scale).numpy()
                     for out, name in zip(self.residual_names, self.residual_inputs, strict=True)}
        return self.unet("out_sample", sample=sample, timestep=timestep, encoder_hidden_states=context, **residuals)


def _unet_residual_inputs(count: int) -> tuple[str, ...]:
    return (*(f"down_block_additional_residual_{i}" for i in range(count - 1)), "mid_block_additional_residual")
