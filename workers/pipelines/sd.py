"""Stable Diffusion 1.x text-to-image on OpenVINO, from an IR folder in optimum-intel's layout.

The models run on OpenVINO; torch is used only on the CPU for what must match diffusers bit for bit: the
initial latents (drawn from a torch.Generator as diffusers' randn_tensor does) and the schedulers. With f32
weights and f32 inference every pixel is within one uint8 level of diffusers' StableDiffusionPipeline.

The other families build on this module: the IR reading and compiling (`CompiledModel`, `read_static`,
`compile_static`, `SDFolder`), the denoising loop with its guidance step (`OVStableDiffusion._denoise`,
`guided_step`) and the image post-processing (`to_uint8`) are written once, here.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.pipelines.interrupt import ShouldStop, check
from workers.pipelines.schedulers import make_scheduler

if TYPE_CHECKING:
    import openvino as ov
    import torch
    from transformers import BatchEncoding, CLIPTokenizer

MODEL_XML = "openvino_model.xml"
# A run's start: (scheduler, generator) -> (initial latents, the timesteps to denoise).
Start = Callable[[Any, "torch.Generator"], tuple["torch.Tensor", Any]]


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
    return read_json(path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


class CompiledModel:
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


def read_static(core: ov.Core, folder: Path, shapes: dict[str, list[int]]) -> ov.Model:
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


def compile_static(core: ov.Core, folder: Path, shapes: dict[str, list[int]], device: str,
                   ov_config: dict[str, str] | None) -> CompiledModel:
    """One IR folder reshaped to `shapes` and compiled on `device`."""
    return CompiledModel(core.compile_model(read_static(core, folder, shapes), device, dict(ov_config or {})))


@dataclass(frozen=True, eq=False)
class SDFolder:
    """An SD-family IR folder read for one static (width, height, cfg) shape: the configs, tokenizer and shapes
    every SD-family loader (SD 1.x, SDXL, ControlNet, img2img) starts from."""

    path: Path
    width: int
    height: int
    cfg: bool
    index: dict[str, Any]
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    tokenizer: CLIPTokenizer
    scale: int  # the VAE's downsampling factor

    @classmethod
    def read(cls, ir_dir: Path, *, width: int, height: int, cfg: bool) -> SDFolder:
        """The folder's configs and tokenizer; ValueError when width or height does not fit the VAE."""
        from transformers import CLIPTokenizer

        ir_dir = Path(ir_dir)
        index = read_model_index(ir_dir)
        vae_config = read_json(ir_dir / "vae_decoder" / "config.json")
        scale = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or value <= 0 or value % scale:
                raise ValueError(f"{name} must be a positive multiple of {scale}, got {value!r}")
        return cls(path=ir_dir, width=width, height=height, cfg=cfg, index=index,
                   unet_config=read_json(ir_dir / "unet" / "config.json"), vae_config=vae_config,
                   scheduler_config=read_json(ir_dir / "scheduler" / "scheduler_config.json"),
                   tokenizer=CLIPTokenizer.from_pretrained(ir_dir / "tokenizer"), scale=scale)

    @property
    def batch(self) -> int:
        # Under CFG the uncond and cond prompts go through each model as one batch of 2.
        return 2 if self.cfg else 1

    @property
    def latent(self) -> list[int]:
        return [self.unet_config["in_channels"], self.height // self.scale, self.width // self.scale]

    def shapes(self) -> dict[str, dict[str, list[int]]]:
        """Static input shapes of the text-to-image models (a new dict: families add their inputs and models).
        vae_encoder is not here: only image-to-image needs it."""
        batch, tokens = self.batch, self.tokenizer.model_max_length
        return {
            "text_encoder": {"input_ids": [batch, tokens]},
            "unet": {"sample": [batch, *self.latent],
                     "encoder_hidden_states": [batch, tokens, self.unet_config["cross_attention_dim"]]},
            "vae_decoder": {"latent_sample": [1, *self.latent]},
        }

    def compile(self, shapes: dict[str, dict[str, list[int]]], *, core: ov.Core, device: str,
                ov_config: dict[str, str] | None) -> dict[str, CompiledModel]:
        return {name: compile_static(core, self.path / name, shape, device, ov_config)
                for name, shape in shapes.items()}

    def pipeline_args(self, models: dict[str, CompiledModel], *, scaling_factor: float = 0.18215) -> dict[str, Any]:
        """OVStableDiffusion's constructor arguments; `scaling_factor` is the family's (SD 1.x's by default), for a
        VAE config that does not record its own."""
        return dict(tokenizer=self.tokenizer, scheduler_config=self.scheduler_config,
                    text_encoder=models["text_encoder"], unet=models["unet"], vae_decoder=models["vae_decoder"],
                    width=self.width, height=self.height, cfg=self.cfg, latent_channels=self.latent[0],
                    vae_scale_factor=self.scale,
                    scaling_factor=float(self.vae_config.get("scaling_factor", scaling_factor)),
                    cfg_capable=self.unet_config.get("time_cond_proj_dim") is None)


class OVStableDiffusion:
    """A warm SD 1.x pipeline compiled for one (width, height, cfg) shape on one device."""

    def __init__(self, *, tokenizer: CLIPTokenizer, scheduler_config: dict[str, Any], text_encoder: CompiledModel,
                 unet: CompiledModel, vae_decoder: CompiledModel, width: int, height: int, cfg: bool,
                 latent_channels: int, vae_scale_factor: int, scaling_factor: float, cfg_capable: bool) -> None:
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

        folder = SDFolder.read(ir_dir, width=width, height=height, cfg=cfg)
        models = folder.compile(folder.shapes(), core=core if core is not None else ov.Core(), device=device,
                                ov_config=ov_config)
        return cls(**folder.pipeline_args(models))

    def generate(self, prompt: str, *, negative_prompt: str = "", steps: int, guidance_scale: float,
                 scheduler: str, seed: int, latents: np.ndarray | None = None,
                 should_stop: ShouldStop = None) -> GenerationResult:
        """One image, as diffusers' StableDiffusionPipeline makes it with generator=manual_seed(seed).

        `should_stop`, checked once per denoising step, ends the render with `Interrupted` when it says so."""

        def start(sched: Any, generator: torch.Generator) -> tuple[torch.Tensor, Any]:
            import torch

            # Initial latents on the CPU from the seed (diffusers' randn_tensor); the same generator then feeds the
            # scheduler's noise (Euler-a), in the same order as in diffusers.
            if latents is None:
                noise = torch.randn(self.latent_shape, generator=generator, dtype=torch.float32)
            else:
                noise = given_latents(latents, self.latent_shape)
            return noise * sched.init_noise_sigma, sched.timesteps

        return self._render(prompt, negative_prompt, steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                            seed=seed, start=start, should_stop=should_stop)

    def _render(self, prompt: str, negative_prompt: str, *, steps: int, guidance_scale: float, scheduler: str,
                seed: int, start: Start, start_phase: str | None = None,
                should_stop: ShouldStop = None) -> GenerationResult:
        """One image of any SD-family pipeline: encode, a fresh scheduler, `start` (initial latents and the
        timesteps to run, timed as `start_phase` when given), denoise, decode; timings per phase."""
        import torch

        # Exactly diffusers' do_classifier_free_guidance.
        cfg = guidance_scale > 1.0 and self.cfg_capable
        require_cfg(self.cfg, cfg, guidance_scale)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        timings: dict[str, float] = {}
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            # Prompt embeddings: [uncond, cond] under CFG, diffusers' order.
            context = self._encode([negative_prompt, prompt] if cfg else [prompt])
            timings["encode"] = time.perf_counter() - started
            # A fresh scheduler per image: schedulers keep per-run state (step index, multistep history).
            sched = make_scheduler(scheduler, self.scheduler_config)
            sched.set_timesteps(steps)
            generator = torch.Generator("cpu").manual_seed(seed)
            mark = time.perf_counter()
            sample, timesteps = start(sched, generator)
            if start_phase is not None:
                timings[start_phase] = time.perf_counter() - mark
            mark = time.perf_counter()
            sample = self._denoise(sched, sample, context, guidance_scale=guidance_scale, generator=generator,
                                   cfg=cfg, timesteps=timesteps, should_stop=should_stop)
            timings["denoise"] = time.perf_counter() - mark
            mark = time.perf_counter()
            image = self._decode(sample)
            timings["decode"] = time.perf_counter() - mark
            timings["total"] = time.perf_counter() - started
        return GenerationResult(image=image, seed=seed, timings=timings)

    def _encode(self, prompts: list[str]) -> Any:
        """The UNet's text conditioning: an array here; a family with more conditions returns what its
        `_predict_noise` takes."""
        ids = tokenize(self.tokenizer, prompts).input_ids
        # optimum-intel exports use int32 or int64 ids depending on its version; feed what the IR declares.
        return self.text_encoder("last_hidden_state", input_ids=ids.astype(self.text_encoder.input_dtype("input_ids")))

    def _denoise(self, sched: Any, latents: torch.Tensor, context: Any, *, guidance_scale: float,
                 generator: torch.Generator, cfg: bool, timesteps: Any, should_stop: ShouldStop = None) -> torch.Tensor:
        """diffusers' denoising loop over `timesteps` (the whole schedule, or image-to-image's tail of it)."""
        import torch

        extra = step_kwargs(sched, generator)
        timestep_dtype = self.unet.input_dtype("timestep")
        for t in timesteps:
            check(should_stop)
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = sched.scale_model_input(model_input, t)
            # float32 keeps fractional timesteps exact; integer timesteps (< 2**24) convert exactly too.
            timestep = np.asarray([t.item()], dtype=timestep_dtype)
            noise_pred = torch.from_numpy(self._predict_noise(model_input.numpy(), timestep, context))
            latents = guided_step(sched, noise_pred, t, latents, guidance_scale=guidance_scale, cfg=cfg, extra=extra)
        return latents

    def _predict_noise(self, sample: np.ndarray, timestep: np.ndarray, context: Any) -> np.ndarray:
        """One UNet call of the loop; the families that condition the UNet on more than text override it."""
        return self.unet("out_sample", sample=sample, timestep=timestep, encoder_hidden_states=context)

    def _decode(self, latents: torch.Tensor) -> np.ndarray:
        import torch

        decoded = self.vae_decoder("sample", latent_sample=(latents / self.scaling_factor).numpy())
        # diffusers' VaeImageProcessor denormalizes [-1, 1] to [0, 1] before its post-processing.
        return to_uint8(torch.from_numpy(decoded) / 2 + 0.5)


def require_cfg(compiled: bool, cfg: bool, guidance_scale: float) -> None:
    """ValueError when a request's guidance needs another batch than the pipeline was compiled for."""
    if cfg != compiled:
        raise ValueError(f"this pipeline is compiled for cfg={compiled} (batch {2 if compiled else 1}), "
                         f"but guidance_scale={guidance_scale} needs cfg={cfg}")


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> BatchEncoding:
    """diffusers' tokenization of prompts: padded to and truncated at the tokenizer's length, as numpy."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="np")


def given_latents(latents: np.ndarray, shape: tuple[int, ...], what: str = "shape") -> torch.Tensor:
    """A request's initial latents (diffusers' `latents`) as a float32 tensor; ValueError unless of `shape`."""
    import torch

    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have {what} {shape}, got {tuple(latents.shape)}")
    return torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32))


def step_kwargs(sched: Any, generator: torch.Generator) -> dict[str, Any]:
    """diffusers' prepare_extra_step_kwargs: eta (0.0) for DDIM, the generator for stochastic samplers."""
    accepted = inspect.signature(sched.step).parameters
    extra: dict[str, Any] = {}
    if "eta" in accepted:
        extra["eta"] = 0.0
    if "generator" in accepted:
        extra["generator"] = generator
    return extra


def guided_step(sched: Any, noise_pred: torch.Tensor, t: Any, latents: torch.Tensor, *, guidance_scale: float,
                cfg: bool, extra: dict[str, Any]) -> torch.Tensor:
    """One step of diffusers' SD-family loops: classifier-free guidance on an [uncond, cond] batch (in diffusers'
    op order, so images match bit for bit), then the scheduler's step."""
    if cfg:
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    return sched.step(noise_pred, t, latents, **extra, return_dict=False)[0]


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """The first image of a batch of [0, 1] NCHW pixels as diffusers post-processes it: clamp, NHWC float,
    then numpy_to_pil's rounding."""
    image = pixels.clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    return (image[0] * 255).round().astype(np.uint8)
