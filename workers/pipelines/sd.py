"""Stable Diffusion 1.x text-to-image on OpenVINO, from an IR folder in optimum-intel's layout.

The models run on OpenVINO; torch is used only on the CPU for what must match diffusers bit for bit: the
initial latents (drawn from a torch.Generator as diffusers' randn_tensor does) and the schedulers. With f32
weights and f32 inference every pixel is within one uint8 level of diffusers' StableDiffusionPipeline.
No Celery here.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.pipelines.schedulers import make_scheduler

if TYPE_CHECKING:
    import openvino as ov
    import torch
    from transformers import CLIPTokenizer

MODEL_XML = "openvino_model.xml"


@dataclass(frozen=True, eq=False)
class GenerationResult:
    image: np.ndarray  # uint8, height x width x 3
    seed: int
    timings: dict[str, float] = field(default_factory=dict)


def read_model_index(ir_dir: Path) -> dict[str, Any]:
    """The pipeline's model_index.json; FileNotFoundError (naming the folder) when it is not a model."""
    path = Path(ir_dir) / "model_index.json"
    if not path.is_file():
        raise FileNotFoundError(f"{ir_dir} is not a converted model: no model_index.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


class _Model:
    """One compiled model and its infer request, called with named numpy inputs."""

    def __init__(self, compiled: ov.CompiledModel) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        # After compilation a port may carry several names (optimisations merge tensors): index them all.
        self.inputs = {name: port for port in compiled.inputs for name in port.get_names()}

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(self.inputs[name].get_element_type().to_dtype())

    def __call__(self, output: str, **inputs: np.ndarray) -> np.ndarray:
        self.request.infer(inputs)
        # The request reuses its output buffer on the next call: keep a copy.
        return self.request.get_tensor(output).data.copy()


class OVStableDiffusion:
    """A warm SD 1.x pipeline compiled for one (width, height, cfg) shape on one device."""

    def __init__(self, *, tokenizer: CLIPTokenizer, scheduler_config: dict[str, Any], text_encoder: _Model,
                 unet: _Model, vae_decoder: _Model, width: int, height: int, cfg: bool, latent_channels: int,
                 vae_scale_factor: int, scaling_factor: float, cfg_capable: bool) -> None:
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.text_encoder, self.unet, self.vae_decoder = text_encoder, unet, vae_decoder
        self.width, self.height, self.cfg = width, height, cfg
        self.latent_channels = latent_channels
        self.vae_scale_factor = vae_scale_factor
        self.scaling_factor = scaling_factor
        self.cfg_capable = cfg_capable
        # Infer requests are not thread-safe; a threaded worker pool may share one warm pipeline.
        self._lock = threading.Lock()

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        f = self.vae_scale_factor
        return (1, self.latent_channels, self.height // f, self.width // f)

    @classmethod
    def load(cls, ir_dir: Path, *, device: str = "CPU", width: int, height: int, cfg: bool,
             core: ov.Core | None = None, ov_config: dict[str, str] | None = None) -> OVStableDiffusion:
        """Read the IR folder, reshape every model to this static shape, and compile it on `device`."""
        import openvino as ov
        from transformers import CLIPTokenizer

        ir_dir = Path(ir_dir)
        # 1. Configs: what the shapes and the arithmetic depend on.
        read_model_index(ir_dir)
        unet_config = _read_json(ir_dir / "unet" / "config.json")
        vae_config = _read_json(ir_dir / "vae_decoder" / "config.json")
        scheduler_config = _read_json(ir_dir / "scheduler" / "scheduler_config.json")
        scale = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0 or value % scale:
                raise ValueError(f"{name} must be a positive multiple of {scale}, got {value!r}")
        tokenizer = CLIPTokenizer.from_pretrained(ir_dir / "tokenizer")
        # 2. Static shapes: under CFG the uncond and cond prompts go through each model as one batch of 2.
        batch, tokens = (2 if cfg else 1), tokenizer.model_max_length
        latent = [unet_config["in_channels"], height // scale, width // scale]
        shapes: dict[str, dict[str, list[int]]] = {
            "text_encoder": {"input_ids": [batch, tokens]},
            "unet": {"sample": [batch, *latent],
                     "encoder_hidden_states": [batch, tokens, unet_config["cross_attention_dim"]]},
            "vae_decoder": {"latent_sample": [1, *latent]},
        }
        # 3. Compile (vae_encoder is not needed for text-to-image, so it is not compiled).
        core = core if core is not None else ov.Core()
        config = dict(ov_config or {})
        models = {name: _Model(core.compile_model(_read_static(core, ir_dir / name, shape), device, config))
                  for name, shape in shapes.items()}
        return cls(tokenizer=tokenizer, scheduler_config=scheduler_config, unet=models["unet"],
                   text_encoder=models["text_encoder"], vae_decoder=models["vae_decoder"], width=width,
                   height=height, cfg=cfg, latent_channels=latent[0], vae_scale_factor=scale,
                   scaling_factor=float(vae_config.get("scaling_factor", 0.18215)),
                   cfg_capable=unet_config.get("time_cond_proj_dim") is None)

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int, guidance_scale: float,
                 scheduler: str, seed: int, latents: np.ndarray | None = None) -> GenerationResult:
        """One image, as diffusers' StableDiffusionPipeline makes it with generator=manual_seed(seed)."""
        import torch

        # Exactly diffusers' do_classifier_free_guidance.
        cfg = guidance_scale > 1.0 and self.cfg_capable
        if cfg != self.cfg:
            raise ValueError(f"this pipeline is compiled for cfg={self.cfg} (batch {2 if self.cfg else 1}), "
                             f"but guidance_scale={guidance_scale} needs cfg={cfg}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            # 1-2. Prompt embeddings: [uncond, cond] under CFG, diffusers' order.
            context = self._encode([negative_prompt, prompt] if cfg else [prompt])
            timings["encode"] = time.perf_counter() - started
            # 3. A fresh scheduler per image: schedulers keep per-run state (step index, multistep history).
            sched = make_scheduler(scheduler, self.scheduler_config)
            sched.set_timesteps(steps)
            # 4. Initial latents on the CPU from the seed (diffusers' randn_tensor); the same generator then
            #    feeds the scheduler's noise (Euler-a), in the same order as in diffusers.
            generator = torch.Generator("cpu").manual_seed(seed)
            if latents is None:
                noise = torch.randn(self.latent_shape, generator=generator, dtype=torch.float32)
            else:
                noise = self._given_latents(latents)
            sample = noise * sched.init_noise_sigma
            # 5. Denoise.
            mark = time.perf_counter()
            sample = self._denoise(sched, sample, context, guidance_scale, generator, cfg)
            timings["denoise"] = time.perf_counter() - mark
            # 6. Decode and post-process as diffusers does.
            mark = time.perf_counter()
            image = self._decode(sample)
            timings["decode"] = time.perf_counter() - mark
            timings["total"] = time.perf_counter() - started
        return GenerationResult(image=image, seed=seed, timings=timings)

    def _encode(self, prompts: list[str]) -> np.ndarray:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids
        # optimum-intel exports use int32 or int64 ids depending on its version; feed what the IR declares.
        ids = ids.astype(self.text_encoder.input_dtype("input_ids"))
        return self.text_encoder("last_hidden_state", input_ids=ids)

    def _given_latents(self, latents: np.ndarray) -> torch.Tensor:
        import torch

        if tuple(latents.shape) != self.latent_shape:
            raise ValueError(f"latents must have shape {self.latent_shape}, got {tuple(latents.shape)}")
        return torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32))

    def _denoise(self, sched: Any, latents: torch.Tensor, context: np.ndarray, guidance_scale: float,
                 generator: torch.Generator, cfg: bool, timesteps: Any = None) -> torch.Tensor:
        import torch

        extra = step_kwargs(sched, generator)
        timestep_dtype = self.unet.input_dtype("timestep")
        # Image-to-image starts part-way: `timesteps` is then the tail of the schedule (workers/pipelines/img2img.py).
        for t in sched.timesteps if timesteps is None else timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = sched.scale_model_input(model_input, t)
            # float32 keeps fractional timesteps exact; integer timesteps (< 2**24) convert exactly too.
            timestep = np.asarray([t.item()], dtype=timestep_dtype)
            out = self.unet("out_sample", sample=model_input.numpy(), timestep=timestep,
                            encoder_hidden_states=context)
            noise_pred = torch.from_numpy(out)
            if cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = sched.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        return latents

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        import torch

        decoded = self.vae_decoder("sample", latent_sample=(latents / self.scaling_factor).numpy())
        # diffusers' VaeImageProcessor: denormalize, clamp, NHWC float, then numpy_to_pil's rounding.
        image = (torch.from_numpy(decoded) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
        return (image[0] * 255).round().astype(np.uint8)


def step_kwargs(sched: Any, generator: torch.Generator) -> dict[str, Any]:
    """diffusers' prepare_extra_step_kwargs: eta (0.0) for DDIM, the generator for stochastic samplers."""
    accepted = inspect.signature(sched.step).parameters
    extra: dict[str, Any] = {}
    if "eta" in accepted:
        extra["eta"] = 0.0
    if "generator" in accepted:
        extra["generator"] = generator
    return extra


def _read_static(core: ov.Core, folder: Path, shapes: dict[str, list[int]]) -> ov.Model:
    """Read one IR and fix its inputs to `shapes`; other dynamic inputs (the timestep) become [1]."""
    xml = folder / MODEL_XML
    if not xml.is_file():
        raise FileNotFoundError(f"{folder.parent} is not a converted model: no {folder.name}/{MODEL_XML}")
    model = core.read_model(xml)
    static: dict[str, list[int]] = {}
    for port in model.inputs:
        names = port.get_names() & shapes.keys()
        partial = port.get_partial_shape()
        if names:
            static[port.get_any_name()] = shapes[names.pop()]
        elif partial.is_dynamic:
            # A timestep exported with shape [?] (ours, optimum's older exports) is one value per step;
            # a rank-0 timestep (optimum's newer exports) is static already.
            static[port.get_any_name()] = [1] * partial.rank.get_length()
    model.reshape(static)
    return model
