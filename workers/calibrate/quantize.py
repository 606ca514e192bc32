"""INT8 artifacts of SD 1.x IR folders with NNCF, calibrated on real pipeline inputs, and their measurement.

"int8" quantizes the UNet (weights and activations) from the inputs it really sees when the float pipeline
renders the calibration prompts; "weights-int8" compresses the weights of every model and needs no data;
"hybrid" does both (UNet quantized, the others weight-compressed). The result is a complete IR folder in the
same optimum-intel layout as its source, so everything that loads one loads the other.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.names import CALIBRATION_MODES as MODES  # the modes a request may name are the plans below
from workers.convert.sd import staging
from workers.pipelines.sd import MODEL_XML

if TYPE_CHECKING:
    import openvino as ov

    from workers.pipelines.sd import CompiledModel, OVStableDiffusion

Sample = dict[str, np.ndarray]  # one UNet call's inputs by name
MODEL_BIN = "openvino_model.bin"
# What each mode does to each model folder: "quantize" (weights and activations, needs data) or "compress"
# (weights only). Folders a mode does not name are copied unchanged.
_PLANS: dict[str, dict[str, str]] = {
    "int8": {"unet": "quantize", "controlnet": "quantize"},
    "weights-int8": {"text_encoder": "compress", "unet": "compress", "vae_decoder": "compress",
                     "vae_encoder": "compress", "controlnet": "compress"},
    "hybrid": {"text_encoder": "compress", "unet": "quantize", "vae_decoder": "compress", "vae_encoder": "compress",
               "controlnet": "quantize"},
}  # a plan's folders that an artifact lacks (controlnet/ outside the ControlNet family) are skipped
# SD 1.x's own scheduler: calibration inputs and validation images are rendered with it.
SCHEDULER = "pndm"
# Identical images have an infinite PSNR; a finite cap keeps reports valid JSON.
PSNR_CAP_DB = 100.0
VALIDATION_SET: tuple[tuple[str, int], ...] = (
    ("a lighthouse on a rocky coast under a starry sky", 11),
    ("a bowl of fresh fruit on a wooden table, still life", 22),
    ("portrait of a woman in a red coat in the snow", 33),
    ("an isometric city block with trees and small shops", 44),
)
# nncf.quantize of SD-1.5's UNet (1.72 GB as FP16) peaked at 15 GB RSS (FIELD-NOTES); bench/int8.py saw 14.7 GB
# with 256x256 samples and 16.5 GB with 512x512 ones. 8.5 x 1.72 GB + 2 GiB = 16.8 GB covers both. Overridable:
# the factor moves with NNCF's version and the calibration size.
MEMORY_FACTOR_ENV = "DARKROOM_CALIBRATION_MEMORY_FACTOR"
DEFAULT_MEMORY_FACTOR = 8.5
MEMORY_MARGIN = 2 * 2**30


@dataclass(frozen=True)
class CalibrationResult:
    out_dir: Path
    mode: str
    samples: int
    seconds: float
    files: tuple[str, ...]


@dataclass(frozen=True)
class Measurements:
    fp_bytes: int
    int8_bytes: int
    size_ratio: float
    unet_fp_bytes: int
    unet_int8_bytes: int
    unet_size_ratio: float
    unet_step_ms: dict[str, float]
    image_s: dict[str, float]
    unet_speedup: float
    image_speedup: float
    psnr_db: float
    min_psnr_db: float
    max_pixel_diff: int
    validation: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class _PipelineRun:
    images: tuple[np.ndarray, ...]
    step_ms: float
    image_s: float


def calibrate_sd(fp_ir_dir: Path, out_dir: Path, prompts: Sequence[str], *, mode: str, steps: int, width: int,
                 height: int, guidance_scale: float = 7.5, seed: int = 0, subset_size: int | None = None,
                 core: ov.Core | None = None, device: str = "CPU") -> CalibrationResult:
    """Write an INT8 copy of the IR folder `fp_ir_dir` to `out_dir` (replacing it); nothing on failure.

    `subset_size` caps the UNet calls NNCF calibrates on (None: every call of every prompt); when there are
    more calls, a seeded random pick over all of them keeps both prompts and timesteps varied.
    """
    import openvino as ov

    started = time.perf_counter()
    fp_ir_dir, out_dir = Path(fp_ir_dir), Path(out_dir)
    # 0. Check the request before any slow work.
    if mode not in MODES:
        raise ValueError(f"unknown calibration mode {mode!r}; expected one of {', '.join(MODES)}")
    if steps < 1 or (subset_size is not None and subset_size < 1):
        raise ValueError(f"steps and subset_size must be at least 1, got {steps} and {subset_size}")
    if not (fp_ir_dir / "unet" / MODEL_XML).is_file():
        raise FileNotFoundError(f"{fp_ir_dir} is not a converted model: no unet/{MODEL_XML}")
    plan = {name: action for name, action in _PLANS[mode].items() if (fp_ir_dir / name / MODEL_XML).is_file()}
    core = core if core is not None else ov.Core()
    # 1. The UNet's real inputs, from the float pipeline rendering the prompts (only quantization needs them).
    samples: dict[str, tuple[Sample, ...]] = {}  # per model folder: unet (and controlnet)
    if "quantize" in plan.values():
        if not prompts:
            raise ValueError(f"mode {mode!r} needs calibration prompts; none were given")
        samples = _record_unet_inputs(fp_ir_dir, prompts, steps=steps, width=width, height=height,
                                      guidance_scale=guidance_scale, seed=seed, keep=subset_size, core=core,
                                      device=device)
        gc.collect()  # the recording pipeline's compiled models
    # 2-3. Build the new folder beside the target; only a finished one is renamed into place.
    with staging(out_dir) as work:
        # Everything but the models being replaced: index, tokenizer, scheduler, configs, anything else.
        replaced = {(name, file) for name in plan for file in (MODEL_XML, MODEL_BIN)}
        shutil.copytree(fp_ir_dir, work, dirs_exist_ok=True, ignore=lambda folder, names: [
            n for n in names if (Path(folder).name, n) in replaced and Path(folder).parent == fp_ir_dir])
        # One model at a time, each freed before the next: quantizing a full UNet peaks at 15-16.5 GB.
        for name, action in plan.items():
            _optimize(core, fp_ir_dir / name / MODEL_XML, work / name / MODEL_XML, action, samples.get(name, ()))
            gc.collect()
    files = tuple(sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()))
    return CalibrationResult(out_dir=out_dir, mode=mode, samples=len(samples.get("unet", ())),
                             seconds=round(time.perf_counter() - started, 3), files=files)


def _record_unet_inputs(fp_ir_dir: Path, prompts: Sequence[str], *, steps: int, width: int, height: int,
                        guidance_scale: float, seed: int, keep: int | None, core: ov.Core,
                        device: str) -> dict[str, tuple[Sample, ...]]:
    """UNet inputs while the float pipeline renders each prompt (prompt i with seed + i): all of them, or
    `keep` picked uniformly at random (seeded) over every call, in call order. A ControlNet model's ControlNet
    inputs are recorded the same way, under "controlnet"."""
    # The device's default precision (bf16 here) is 2-4x faster than f32, and the inputs need only be
    # representative: NNCF re-runs them in f32 itself.
    pipe = _load_pipeline(fp_ir_dir, device=device, width=width, height=height,
                          cfg=_uses_cfg(fp_ir_dir, guidance_scale), core=core)
    recorders = {"unet": _RecordingUNet(pipe.unet, keep, seed)}
    pipe.unet = recorders["unet"]  # type: ignore[assignment]  # the pipeline needs only input_dtype and __call__
    if hasattr(pipe, "controlnet"):
        recorders["controlnet"] = _RecordingUNet(pipe.controlnet, keep, seed + 1)
        pipe.controlnet = recorders["controlnet"]
    for i, prompt in enumerate(prompts):
        pipe.generate(prompt, steps=steps, guidance_scale=guidance_scale, scheduler=SCHEDULER, seed=seed + i)
    return {name: tuple(sample for _, sample in sorted(rec.kept, key=lambda kept: kept[0]))
            for name, rec in recorders.items()}


def _load_pipeline(ir_dir: Path, **kwargs: Any) -> Any:
    """The float or INT8 pipeline of an IR folder, of its family. Calibration and measurement give a ControlNet
    model a procedural control image (workers/pipelines/controlnet.py), since their prompts come without one."""
    from workers.pipelines.controlnet import OVControlNetPipeline, is_controlnet_ir, procedural_control
    from workers.pipelines.sd import OVStableDiffusion

    if not is_controlnet_ir(ir_dir):
        return OVStableDiffusion.load(ir_dir, **kwargs)
    pipe = OVControlNetPipeline.load(ir_dir, **kwargs)
    pipe.fallback_control = procedural_control(kwargs["width"], kwargs["height"])
    return pipe


class _RecordingUNet:
    """Stands in for the pipeline's UNet: keeps copies of its calls' inputs, then runs each call.

    With `keep`, a reservoir sample: memory stays at `keep` samples however many prompts and steps run, and
    the kept calls spread over all prompts and timesteps (NNCF would take the first ones, all from the first
    prompt or two).
    """

    def __init__(self, model: CompiledModel, keep: int | None, seed: int) -> None:
        self.model, self.input_dtype, self.keep = model, model.input_dtype, keep
        self.rng = np.random.default_rng(seed)
        self.kept: list[tuple[int, Sample]] = []
        self.seen = 0

    def __call__(self, output: str, **inputs: np.ndarray) -> np.ndarray:
        # Algorithm R: once full, call i replaces a random kept one with probability keep / (i + 1).
        full = self.keep is not None and len(self.kept) >= self.keep
        slot = int(self.rng.integers(self.seen + 1)) if full else len(self.kept)
        if slot < len(self.kept) or not full:
            sample = (self.seen, {name: np.array(value, copy=True) for name, value in inputs.items()})
            self.kept[slot:slot + 1] = [sample]
        self.seen += 1
        return self.model(output, **inputs)


def _optimize(core: ov.Core, source: Path, target: Path, action: str, samples: tuple[Sample, ...]) -> None:
    import nncf
    import openvino as ov

    model = core.read_model(source)
    # Keep the source's weight format for what stays float (biases, norms): an fp32 artifact stays comparable.
    fp16 = any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.f16 for op in model.get_ops())
    if action == "quantize":
        # OpenVINO's SD recipe: transformer model type (SmoothQuant, attention-aware placement), and no bias
        # correction, which costs much time and memory on a UNet for no visible gain.
        model = nncf.quantize(model, nncf.Dataset(list(samples)), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(samples),
                              advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True))
    else:
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(model, target, compress_to_fp16=fp16)
    del model


def _uses_cfg(ir_dir: Path, guidance_scale: float) -> bool:
    # diffusers' do_classifier_free_guidance; a guidance-distilled UNet (LCM) never runs CFG.
    unet_config = json.loads((Path(ir_dir) / "unet" / "config.json").read_text(encoding="utf-8"))
    return guidance_scale > 1.0 and unet_config.get("time_cond_proj_dim") is None


def measure(fp_ir_dir: Path, int8_ir_dir: Path, *, width: int, height: int, steps: int,
            validation: Sequence[tuple[str, int]], guidance_scale: float = 7.5, repeats: int = 3,
            device: str = "CPU", core: ov.Core | None = None) -> Measurements:
    """Size, speed and image drift of `int8_ir_dir` against `fp_ir_dir`, all measured on this worker.

    UNet step times are medians of `repeats` calls after a warm-up; image times are medians over the
    validation images, which both pipelines render with the same prompts and seeds.
    """
    import openvino as ov

    fp_ir_dir, int8_ir_dir = Path(fp_ir_dir), Path(int8_ir_dir)
    pairs = tuple((str(prompt), int(seed)) for prompt, seed in validation)
    if not pairs or repeats < 1:
        raise ValueError("measure needs at least one validation (prompt, seed) pair and one repeat")
    core = core if core is not None else ov.Core()
    cfg = _uses_cfg(fp_ir_dir, guidance_scale)
    # 1. Sizes on disk.
    fp_bytes, int8_bytes = _ir_bytes(fp_ir_dir), _ir_bytes(int8_ir_dir)
    unet_fp, unet_int8 = _ir_bytes(fp_ir_dir / "unet"), _ir_bytes(int8_ir_dir / "unet")
    # 2. The float UNet in f32, the precision the float artifact promises (diffusers parity).
    pipe = _load_pipeline(fp_ir_dir, device=device, width=width, height=height, cfg=cfg, core=core,
                                  ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    fp32_ms = _step_ms(pipe.unet, repeats)
    del pipe
    gc.collect()
    # 3. Both artifacts at the device's default precision (what a worker serves), one after the other.
    runs: dict[str, _PipelineRun] = {}
    for label, folder in (("default", fp_ir_dir), ("int8", int8_ir_dir)):
        pipe = _load_pipeline(folder, device=device, width=width, height=height, cfg=cfg, core=core)
        runs[label] = _run_pipeline(pipe, pairs, steps=steps, guidance_scale=guidance_scale, repeats=repeats)
        del pipe
        gc.collect()
    # 4. Image drift, per validation image.
    psnrs, max_diff = [], 0
    for a, b in zip(runs["default"].images, runs["int8"].images, strict=True):
        diff = a.astype(np.int16) - b.astype(np.int16)
        max_diff = max(max_diff, int(np.abs(diff).max()))
        mse = float(np.mean(diff.astype(np.float64) ** 2))
        psnrs.append(PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * np.log10(255.0**2 / mse)))
    step_ms = {"fp32": fp32_ms, "default": runs["default"].step_ms, "int8": runs["int8"].step_ms}
    image_s = {"default": runs["default"].image_s, "int8": runs["int8"].image_s}
    return Measurements(
        fp_bytes=fp_bytes, int8_bytes=int8_bytes, size_ratio=_ratio(int8_bytes, fp_bytes), unet_fp_bytes=unet_fp,
        unet_int8_bytes=unet_int8, unet_size_ratio=_ratio(unet_int8, unet_fp), unet_step_ms=step_ms, image_s=image_s,
        unet_speedup=_ratio(step_ms["default"], step_ms["int8"]),
        image_speedup=_ratio(image_s["default"], image_s["int8"]),
        psnr_db=round(float(np.mean(psnrs)), 3), min_psnr_db=round(float(min(psnrs)), 3), max_pixel_diff=max_diff,
        validation=pairs)


def _run_pipeline(pipe: OVStableDiffusion, pairs: tuple[tuple[str, int], ...], *, steps: int,
                  guidance_scale: float, repeats: int) -> _PipelineRun:
    # Step timing first: its warm-up call also warms the pipeline for the timed images.
    step_ms = _step_ms(pipe.unet, repeats)
    images, seconds = [], []
    for prompt, seed in pairs:
        out = pipe.generate(prompt, steps=steps, guidance_scale=guidance_scale, scheduler=SCHEDULER, seed=seed)
        images.append(out.image)
        seconds.append(out.timings["total"])
    return _PipelineRun(images=tuple(images), step_ms=step_ms, image_s=round(statistics.median(seconds), 4))


def _step_ms(unet: CompiledModel, repeats: int) -> float:
    """Median milliseconds of one UNet call at its compiled (static) shape, after one warm-up call."""
    rng = np.random.default_rng(0)
    inputs = {}
    # Every input (a ControlNet model's UNet also takes the residuals), by the name each port was given.
    for name in sorted({port.get_any_name() for port in unet.compiled.inputs}):
        shape, dtype = list(unet.inputs[name].get_shape()), unet.input_dtype(name)
        inputs[name] = (np.full(shape, 500, dtype) if name == "timestep"
                        else rng.standard_normal(shape).astype(dtype))
    unet("out_sample", **inputs)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        unet("out_sample", **inputs)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def _ir_bytes(folder: Path) -> int:
    # The models only (bin + xml): configs and the tokenizer are the same in both artifacts.
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and p.suffix in (".xml", ".bin"))


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


def estimate_peak_memory(fp_ir_dir: Path) -> int:
    """Bytes a calibration of this model needs at its peak (nncf.quantize of the UNet)."""
    factor = float(os.environ.get(MEMORY_FACTOR_ENV) or DEFAULT_MEMORY_FACTOR)
    return int(factor * _fp16_weight_bytes(Path(fp_ir_dir) / "unet" / MODEL_XML)) + MEMORY_MARGIN


def _fp16_weight_bytes(xml: Path) -> int:
    """The UNet's constant bytes as they would be stored in FP16 (an fp32 IR counts half)."""
    import xml.etree.ElementTree as ET

    total = 0
    for _, element in ET.iterparse(xml):
        if element.tag == "layer" and element.get("type") == "Const":
            data = element.find("data")
            if data is not None:
                size = int(data.get("size", 0))
                total += size // 2 if data.get("element_type") == "f32" else size
            element.clear()
    return total


def available_memory() -> int:
    """Bytes this process can still allocate: MemAvailable, bounded by a cgroup v2 limit in a container."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        meminfo = Path("/proc/meminfo").read_text(encoding="utf-8")
        match = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
        available = int(match.group(1)) * 1024 if match else 0
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text(encoding="utf-8").strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text(encoding="utf-8").strip())
            available = min(available, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller: the machine's figure stands
    return available


def package_versions() -> dict[str, str]:
    """Versions of what shaped an artifact, for its report."""
    from importlib import metadata

    from tasks.version import __version__

    versions = {}
    for name in ("openvino", "nncf", "torch", "diffusers", "transformers", "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["darkroom"] = __version__
    return versions
