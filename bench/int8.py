"""INT8 vs BF16 vs FP32 for a full-size SD-1.5 UNet on OpenVINO: size, calibration cost, speed per step.

Run: .venv/bin/python bench/int8.py --sizes 256,512 --samples 4 --repeats 5
(about 2.5 minutes on 2 idle cores, 5 when shared; peak RSS about 15 GB during nncf.quantize, so run nothing
 else big meanwhile. --work-dir DIR keeps the two IRs there, and a later run with the same DIR only re-times them.)

The UNet has SD-1.5's published architecture with random weights (no hub here). It is converted to IR with
FP16-compressed weights as optimum does, quantized by nncf.quantize with darkroom's recipe (ModelType.TRANSFORMER,
bias correction off) on a few random but realistic samples (latents N(0,1), timesteps spread over 1..999, text
embeddings N(0,1)), then each variant is timed per UNet call at batch 2 (CFG). Writes bench/results/int8.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from models import SD15_UNET  # noqa: E402  (bench/models.py: SD-1.5's UNet config, written out)

TEXT_TOKENS, CONTEXT = 77, 768
BATCH = 2  # uncond + cond under classifier-free guidance
# The seed table (FIELD-NOTES and the task): optimum's SD-1.5 IR sizes, and seconds per UNet forward at 256x256.
SEED_MB = {"fp16": 1639, "int8": 821}
FIELD_NOTES_S_256 = {"fp32": 1.38, "bf16": 0.37, "int8": 0.27}


class PeakRSS:
    """Peak resident memory of this process over a block, sampled every 50 ms (psutil)."""

    def __init__(self) -> None:
        import psutil

        self._process, self.start, self.peak, self._stop = psutil.Process(), 0, 0, threading.Event()

    @contextmanager
    def watch(self) -> Iterator[PeakRSS]:
        self.start = self.peak = self._process.memory_info().rss
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self._stop.clear()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._process.memory_info().rss)


def build_and_convert(xml: Path) -> dict[str, float]:
    """SD-1.5's UNet with random weights, traced to IR and saved with FP16 weights (optimum's default)."""
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    started = time.perf_counter()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    built = time.perf_counter() - started

    class Export(torch.nn.Module):
        def __init__(self, owner: torch.nn.Module) -> None:
            super().__init__()
            self.unet = owner

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            return self.unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]

    # As workers/convert/sd.py does: traced at a latent side that is not a multiple of 8 (general upsampling path),
    # float32 timestep of shape [?], dynamic batch and spatial sizes.
    example = (torch.randn(BATCH, 4, 9, 9), torch.tensor([999.0]), torch.randn(BATCH, TEXT_TOKENS, CONTEXT))
    shapes = [ov.PartialShape([-1, 4, -1, -1]), ov.PartialShape([-1]), ov.PartialShape([-1, -1, CONTEXT])]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation and frozen-branch warnings: expected here
        model = ov.convert_model(Export(unet), example_input=example, input=shapes)
    for port, name in zip(model.inputs, ("sample", "timestep", "encoder_hidden_states"), strict=True):
        port.get_tensor().set_names({name})
    model.outputs[0].get_tensor().set_names({"out_sample"})
    converted = time.perf_counter() - started - built
    del unet, example
    gc.collect()
    mark = time.perf_counter()
    ov.save_model(model, xml, compress_to_fp16=True)
    saved = time.perf_counter() - mark
    del model
    gc.collect()
    return {"build_s": round(built, 1), "convert_s": round(converted, 1), "save_s": round(saved, 1)}


def calibration_samples(count: int, latent: int) -> list[dict[str, np.ndarray]]:
    """Random but realistic UNet inputs: N(0,1) latents and text embeddings, timesteps spread over 1..999."""
    rng = np.random.default_rng(0)
    steps = np.linspace(999, 1, count) if count > 1 else np.array([500.0])
    return [{"sample": rng.standard_normal((BATCH, 4, latent, latent), dtype=np.float32),
             "timestep": np.array([t], dtype=np.float32),
             "encoder_hidden_states": rng.standard_normal((BATCH, TEXT_TOKENS, CONTEXT), dtype=np.float32)}
            for t in steps]


def quantize(fp_xml: Path, int8_xml: Path, samples: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """darkroom's recipe (workers/calibrate/quantize.py) on the UNet IR; wall time and peak RSS of the quantize call."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(fp_xml)
    with PeakRSS().watch() as rss:
        started = time.perf_counter()
        model = nncf.quantize(model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(samples),
                              advanced_parameters=nncf.AdvancedQuantizationParameters(disable_bias_correction=True))
        seconds = time.perf_counter() - started
    mark = time.perf_counter()
    ov.save_model(model, int8_xml, compress_to_fp16=True)
    saved = time.perf_counter() - mark
    del model
    gc.collect()
    return {"quantize_s": round(seconds, 1), "save_s": round(saved, 1), "peak_rss_gb": round(rss.peak / 1e9, 2),
            "rss_before_gb": round(rss.start / 1e9, 2)}


def time_size(variants: dict[str, tuple[Path, dict[str, str]]], latent: int, repeats: int,
              say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """ms per UNet call of each variant at one static shape (batch 2), and each one's output for drift.

    All variants are compiled first, then called in turn, round after round: a neighbour process that takes
    a core for a while slows every variant alike instead of one of them (these 2 cores are shared).
    """
    import openvino as ov

    core = ov.Core()
    inputs = calibration_samples(1, latent)[0]
    requests, rows = {}, {}
    for name, (xml, config) in variants.items():
        model = core.read_model(xml)
        model.reshape({"sample": [BATCH, 4, latent, latent], "timestep": [1],
                       "encoder_hidden_states": [BATCH, TEXT_TOKENS, CONTEXT]})
        started = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        rows[name] = {"compile_s": round(time.perf_counter() - started, 1),
                      "precision": compiled.get_property("INFERENCE_PRECISION_HINT").to_string()}
        requests[name] = compiled.create_infer_request()
        requests[name].infer(inputs)  # warm-up
        del model
    say(f"  compiled {', '.join(variants)}; timing {repeats} rounds")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, request in requests.items():
            mark = time.perf_counter()
            request.infer(inputs)
            times[name].append((time.perf_counter() - mark) * 1000)
    for name, request in requests.items():
        rows[name].update(ms=round(statistics.median(times[name]), 1), min_ms=round(min(times[name]), 1),
                          runs_ms=[round(t) for t in times[name]], output=request.get_output_tensor(0).data.copy())
    del requests
    gc.collect()
    return rows


def mb(xml: Path) -> float:
    return round((xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20, 1)


def run(args: argparse.Namespace, work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    import openvino as ov

    from workers.calibrate.quantize import package_versions

    fp_xml, int8_xml = work / "fp16" / "openvino_model.xml", work / "int8" / "openvino_model.xml"
    fp_xml.parent.mkdir(parents=True, exist_ok=True)
    int8_xml.parent.mkdir(parents=True, exist_ok=True)
    stages_file = work / "stages.json"
    stages = json.loads(stages_file.read_text(encoding="utf-8")) if stages_file.is_file() else {}
    # 1. The FP16 IR (kept from an earlier run in the same --work-dir).
    if "conversion" not in stages:
        say("building and converting the SD-1.5 UNet ...")
        stages["conversion"] = build_and_convert(fp_xml)
        stages_file.write_text(json.dumps(stages), encoding="utf-8")
    convert = stages["conversion"]
    say(f"  conversion {convert}")
    # 2. INT8 by nncf.quantize, alone in memory.
    if "calibration" not in stages:
        say(f"nncf.quantize on {args.samples} samples at {args.calib_size}x{args.calib_size} ...")
        stages["calibration"] = {"samples": args.samples, "size": args.calib_size,
                                 **quantize(fp_xml, int8_xml, calibration_samples(args.samples, args.calib_size // 8))}
        stages_file.write_text(json.dumps(stages), encoding="utf-8")
    calib = stages["calibration"]
    say(f"  calibration {calib}")
    sizes = {"fp16_mb": mb(fp_xml), "int8_mb": mb(int8_xml)}
    sizes["ratio"] = round(sizes["int8_mb"] / sizes["fp16_mb"], 3)
    # 3. One compiled model at a time: FP32 (f32 hint), the CPU default (bf16 here), INT8.
    variants = {"fp32": (fp_xml, {"INFERENCE_PRECISION_HINT": "f32"}), "bf16": (fp_xml, {}), "int8": (int8_xml, {})}
    timings: dict[str, dict[str, Any]] = {}
    for size in args.sizes:
        say(f"timing {size}x{size} ...")
        row: dict[str, Any] = time_size(variants, size // 8, args.repeats, say)
        reference = row["fp32"]["output"]
        for name in variants:
            out = row[name].pop("output")
            # Drift of each variant's output from FP32 on the same input (relative L2).
            row[name]["rel_err_vs_fp32"] = round(float(np.linalg.norm(out - reference) / np.linalg.norm(reference)), 5)
        row["int8_speedup_vs_bf16"] = round(row["bf16"]["ms"] / row["int8"]["ms"], 2)
        # Fastest runs: what the hardware does when nothing else shares the 2 cores.
        row["int8_speedup_vs_bf16_min"] = round(row["bf16"]["min_ms"] / row["int8"]["min_ms"], 2)
        row["bf16_speedup_vs_fp32"] = round(row["fp32"]["ms"] / row["bf16"]["ms"], 2)
        # Other processes on the machine skew every figure: keep the load next to them.
        row["loadavg_1m"] = round(os.getloadavg()[0], 2)
        timings[str(size)] = row
    core = ov.Core()
    return {
        "command": " ".join(sys.argv), "unet_config": SD15_UNET, "batch": BATCH,
        "machine": {"cpu": core.get_property("CPU", "FULL_DEVICE_NAME"), "platform": platform.platform(),
                    "cores": os.cpu_count(),
                    "ov_capabilities": list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")),
                    "default_precision": core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()},
        "versions": package_versions(), "conversion": convert,
        "calibration": calib,
        "sizes": {**sizes, "seed_fp16_mb": SEED_MB["fp16"], "seed_int8_mb": SEED_MB["int8"],
                  "seed_ratio": round(SEED_MB["int8"] / SEED_MB["fp16"], 3)},
        "unet_step": timings, "field_notes_s_per_step_256": FIELD_NOTES_S_256,
    }


def print_table(result: dict[str, Any]) -> None:
    sizes, calib = result["sizes"], result["calibration"]
    print(f"\nCPU {result['machine']['cpu']} ({result['machine']['cores']} cores), default precision "
          f"{result['machine']['default_precision']}; OpenVINO {result['versions']['openvino']}, "
          f"NNCF {result['versions']['nncf']}")
    print(f"IR size   FP16 {sizes['fp16_mb']:.0f} MB, INT8 {sizes['int8_mb']:.0f} MB, ratio {sizes['ratio']:.3f}"
          f"   (seed table: {sizes['seed_fp16_mb']} MB, {sizes['seed_int8_mb']} MB, ratio {sizes['seed_ratio']:.3f})")
    print(f"convert   {result['conversion']['convert_s']} s; nncf.quantize {calib['quantize_s']} s on "
          f"{calib['samples']} samples at {calib['size']}px, peak RSS {calib['peak_rss_gb']} GB")
    print(f"\n{'UNet step, batch 2':<18}{'FP32 ms':>12}{'BF16 ms':>12}{'INT8 ms':>12}{'INT8/BF16':>11}"
          f"{'BF16 err':>10}{'INT8 err':>10}{'load':>6}")
    for size, row in result["unet_step"].items():
        cells = "".join(f"{row[v]['ms']:>7.0f}/{row[v]['min_ms']:<4.0f}" for v in ("fp32", "bf16", "int8"))
        speedup = f"{row['int8_speedup_vs_bf16']:>5.2f}/{row['int8_speedup_vs_bf16_min']:<4.2f}x"
        print(f"{size + 'x' + size:<18}{cells}{speedup}{row['bf16']['rel_err_vs_fp32']:>10.4f}"
              f"{row['int8']['rel_err_vs_fp32']:>10.4f}{row['loadavg_1m']:>6.1f}")
    notes = {k: round(v * 1000) for k, v in result["field_notes_s_per_step_256"].items()}
    print(f"{'FIELD-NOTES 256':<18}{notes['fp32']:>7}{'':5}{notes['bf16']:>7}{'':5}{notes['int8']:>7}{'':5}"
          f"{notes['bf16'] / notes['int8']:>5.2f}x   (a Xeon with AMX there)")
    print("(ms: median/fastest of the repeats; err: relative L2 distance of the UNet output from FP32's on the same\n"
          " input; load: 1-minute load average after the row: above ~2 on 2 cores, other processes shared the CPU)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256,512", help="image sizes to time, comma-separated")
    parser.add_argument("--samples", type=int, default=4, help="calibration samples for nncf.quantize")
    parser.add_argument("--calib-size", type=int, default=256, help="image size of the calibration samples")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one call per variant), after a warm-up")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "int8.json")
    parser.add_argument("--work-dir", type=Path, help="keep the IRs here and reuse them (default: a temp dir)")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)

    if args.work_dir:
        result = run(args, args.work_dir, say)
    else:
        with tempfile.TemporaryDirectory(prefix="darkroom-int8-bench-") as tmp:
            result = run(args, Path(tmp), say)
    result["total_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print_table(result)
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
