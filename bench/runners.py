"""The benchmark's runners in the project's venv: darkroom (queue and in-process, FP and INT8), diffusers on
PyTorch (FP32, bf16 autocast), FLOP counting and the matmul peaks. Called one per process by bench/peers.py:
`python bench/runners.py NAME PARAMS_JSON OUT_JSON` (see bench/common.py).
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from common import GUIDANCE, NEGATIVE, PROMPT, Params, Result, StepTimer, measure, runner_main, summarize  # noqa: E402
from models import build_pipeline_folder  # noqa: E402


def build(p: Params) -> Result:
    folder = build_pipeline_folder(Path(p["out"]), p["model"], seed=p["seed"])
    return {"folder": str(folder)}


class _Services:
    """Embedded Redis, local storage under the work dir, and one real `darkroom worker` process."""

    def __init__(self, work: Path, queues: list[str]) -> None:
        from broker.embedded import EmbeddedRedis
        from broker.settings import Settings
        from testkit.fleet import WorkerProcess

        work.mkdir(parents=True, exist_ok=True)
        self.redis = EmbeddedRedis.start()
        self.settings = Settings(broker_url=self.redis.url, storage_url=str(work / "storage"),
                                 cache_dir=work / "cache")
        self.worker = WorkerProcess(self.settings, queues, work / "worker.log")
        try:
            self.worker.start()
        except BaseException:
            self.redis.stop()
            raise

    def worker_peak_gb(self) -> float:
        """Peak RSS (VmHWM) of the worker and its pool children, read before they exit."""
        import psutil

        assert self.worker.process is not None
        root = psutil.Process(self.worker.process.pid)
        peaks = []
        for proc in [root, *root.children(recursive=True)]:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peaks += [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
        return round(max(peaks) * 1024 / 1e9, 2)

    def stop(self) -> None:
        self.worker.stop()
        self.redis.stop()


def convert(p: Params) -> Result:
    """darkroom's conversion job through the queue (once per fingerprint: storage keeps the IR across runs)."""
    from darkroom import submit_convert

    services = _Services(Path(p["work"]), ["convert"])
    try:
        started = time.perf_counter()
        done = submit_convert(p["source"], name=p["name"], settings=services.settings).get(timeout=3600)
        seconds = time.perf_counter() - started
    finally:
        services.stop()
    return {"ir": unquote(urlparse(done["uri"]).path), "convert_s": round(seconds, 1)}


def calibrate(p: Params) -> Result:
    """darkroom's INT8 recipe (workers/calibrate/quantize.py): UNet inputs recorded from the pipeline, nncf.quantize."""
    from workers.calibrate.quantize import calibrate_sd

    # nncf.quantize of a full UNet peaks at ~15 GB: if memory runs out, let the kernel end this process first,
    # never a neighbour's.
    Path("/proc/self/oom_score_adj").write_text("1000")
    out = Path(p["out"])
    if (out / "unet" / "openvino_model.xml").is_file():
        return {"int8": str(out), "calibrate_s": None, "cached": True}
    prompts = [PROMPT, "a lighthouse on a rocky coast under a starry sky"]
    result = calibrate_sd(Path(p["ir"]), out, prompts, mode="int8", steps=p["calib_steps"], width=p["size"],
                          height=p["size"], guidance_scale=GUIDANCE, subset_size=p["samples"])
    return {"int8": str(result.out_dir), "calibrate_s": result.seconds, "samples": result.samples}


def _load_darkroom(ir: str, size: int, cache: Path) -> tuple[Any, StepTimer]:
    from workers.pipelines.sd import OVStableDiffusion
    from workers.runtime.device import compile_config

    pipe = OVStableDiffusion.load(Path(ir), device="CPU", width=size, height=size, cfg=True,
                                  ov_config=compile_config("CPU", cache_dir=cache))
    timer = StepTimer()
    unet = pipe.unet

    class TimedUNet:
        input_dtype = unet.input_dtype
        __call__ = staticmethod(timer.wrap(unet))

    pipe.unet = TimedUNet()
    return pipe, timer


def darkroom_int8(p: Params) -> Result:
    """The INT8 artifact in darkroom's pipeline, in-process."""
    pipe, timer = _load_darkroom(p["ir"], p["size"], Path(p["work"]) / "cache-inproc")

    def generate(seed: int, steps: int) -> None:
        pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=GUIDANCE, scheduler="pndm",
                      seed=seed)

    return measure(generate, timer, p, p["say"])


def darkroom(p: Params) -> Result:
    """darkroom's pipeline in-process and through the queue (one warm worker), image by image, interleaved.

    Interleaving makes the queue overhead a difference of neighbours: a noisy neighbour slows both alike.
    """
    import resource

    from darkroom import submit

    work, size, say = Path(p["work"]), p["size"], p["say"]
    pipe, timer = _load_darkroom(p["ir"], size, work / "cache-inproc")
    services = _Services(work, ["generate.CPU"]) if p["queue"] else None

    def local(seed: int, steps: int) -> None:
        pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=GUIDANCE, scheduler="pndm",
                      seed=seed)

    def queued(seed: int, steps: int) -> None:
        # Polled every 20 ms: ~10 ms of latency on average, and a poller that takes no CPU the worker needs.
        assert services is not None
        submit([PROMPT], model=p["name"], negative_prompt=NEGATIVE, seed=seed, steps=steps, guidance=GUIDANCE,
               width=size, height=size, scheduler="pndm", settings=services.settings).wait(timeout=3600,
                                                                                          poll=0.02)

    try:
        for i in range(p["warmup"]):
            local(1000 + i, p["warmup_steps"])
            if services:
                queued(1000 + i, p["warmup_steps"])
        timer.ms.clear()
        inproc_s: list[float] = []
        queue_s: list[float] = []
        for i in range(p["runs"]):
            for path, times in ((local, inproc_s), (queued, queue_s)):
                if path is queued and not services:
                    continue
                started = time.perf_counter()
                path(i, p["steps"])
                times.append(time.perf_counter() - started)
            say(f"image {i + 1}/{p['runs']}: in-process {inproc_s[-1]:.2f} s"
                + (f", queue {queue_s[-1]:.2f} s" if queue_s else ""))
        worker_peak = services.worker_peak_gb() if services else None
        # This process holds the in-process pipeline and only a Redis client; the worker is a child process.
        inproc_peak = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    finally:
        if services:
            services.stop()
    result: Result = {"inproc": {**summarize(inproc_s, timer.ms), "peak_rss_gb": inproc_peak}}
    if queue_s:
        # Overhead per image: median of the per-pair differences (each queued image minus its in-process twin).
        diffs = [q - i for q, i in zip(queue_s, inproc_s, strict=True)]
        result["queue"] = {**summarize(queue_s, []), "peak_rss_gb": worker_peak,
                           "overhead_ms": round(1000 * statistics.median(diffs), 1),
                           "overhead_pct": round(100 * statistics.median(diffs) / statistics.median(inproc_s), 2)}
    return result


def _diffusers(p: Params, bf16: bool) -> Result:
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(p["source"], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    timer = StepTimer()
    pipe.unet.forward = timer.wrap(pipe.unet.forward)

    def generate(seed: int, steps: int) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pipe(PROMPT, negative_prompt=NEGATIVE or None, num_inference_steps=steps, guidance_scale=GUIDANCE,
                 width=p["size"], height=p["size"], output_type="np",
                 generator=torch.Generator().manual_seed(seed))

    return {**measure(generate, timer, p, p["say"]), "torch_threads": torch.get_num_threads()}


def diffusers_fp32(p: Params) -> Result:
    return _diffusers(p, bf16=False)


def diffusers_bf16(p: Params) -> Result:
    return _diffusers(p, bf16=True)


def flops(p: Params) -> Result:
    """FLOPs of one UNet call at batch 2 (CFG) per image size, by torch's FlopCounterMode (on the meta device:
    shapes only, no arithmetic)."""
    import torch
    from models import MODELS, TEXT_TOKENS, build_unet
    from torch.utils.flop_counter import FlopCounterMode

    config = MODELS[p["model"]]["unet"]
    with torch.device("meta"):
        unet = build_unet(p["model"], 0)
    out = {}
    for size in p["sizes"]:
        latent = size // 8
        with torch.device("meta"), torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(torch.randn(2, 4, latent, latent), torch.tensor([999.0]),
                 encoder_hidden_states=torch.randn(2, TEXT_TOKENS, config["cross_attention_dim"]))
        out[str(size)] = counter.get_total_flops()
    return {"unet_flops_batch2": out, "params": sum(x.numel() for x in unet.parameters())}


def matmul(p: Params) -> Result:
    """This machine's matmul throughput (GFLOP/s): OpenVINO FP32, bf16 (the CPU default here), INT8 (a
    FakeQuantize'd activation times int8 weights,
    lowered to a u8 x i8 kernel), and torch bf16. A [n, n] x [n, n] MatMul with constant
    weights, as the UNet's linear layers are."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    import torch

    n, reps = p["n"], p["reps"]
    rng = np.random.default_rng(0)
    a, w = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    core = ov.Core()

    def ov_gflops(int8: bool, config: dict[str, str]) -> float:
        x = ops.parameter([n, n], ov.Type.f32, name="x")
        lhs, rhs = x.output(0), ops.constant(w.T.copy()).output(0)
        if int8:
            # As nncf.quantize leaves a linear layer: FakeQuantize on the activation, int8 weights with a
            # per-channel dequantizing Multiply. The CPU plugin runs it as a u8 x i8 FullyConnected.
            lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
            lhs = ops.fake_quantize(lhs, lo, hi, lo, hi, 256).output(0)
            scale = np.abs(w.T).max(axis=1, keepdims=True) / 127
            rhs = ops.multiply(ops.convert(ops.constant(np.round(w.T / scale).astype(np.int8)), ov.Type.f32),
                               ops.constant(scale.astype(np.float32))).output(0)
        model = ov.Model([ops.matmul(lhs, rhs, False, True)], [x])
        request = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config}).create_infer_request()
        request.infer({0: a})
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            request.infer({0: a})
            times.append(time.perf_counter() - started)
        return 2 * n**3 / min(times) / 1e9

    ta, tw = torch.from_numpy(a).bfloat16(), torch.from_numpy(w).bfloat16()
    torch.matmul(ta, tw)
    torch_times = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.matmul(ta, tw)
        torch_times.append(time.perf_counter() - started)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = {"n": n, "ov_fp32": ov_gflops(False, {"INFERENCE_PRECISION_HINT": "f32"}),
                  "ov_bf16": ov_gflops(False, {"INFERENCE_PRECISION_HINT": "bf16"}),
                  "ov_int8": ov_gflops(True, {}), "torch_bf16": 2 * n**3 / min(torch_times) / 1e9,
                  "cpu": core.get_property("CPU", "FULL_DEVICE_NAME")}
    result = {k: round(v, 1) if isinstance(v, float) else v for k, v in result.items()}
    # The peak of a precision: the best this machine reached with any library (fastest of the repeats).
    result["peak_gflops"] = {"fp32": result["ov_fp32"], "bf16": max(result["ov_bf16"], result["torch_bf16"]),
                             "int8": result["ov_int8"]}
    return result


RUNNERS = {"build": build, "convert": convert, "calibrate": calibrate, "darkroom": darkroom,
           "darkroom-int8": darkroom_int8, "diffusers-fp32": diffusers_fp32, "diffusers-bf16": diffusers_bf16,
           "flops": flops, "matmul": matmul}

if __name__ == "__main__":
    sys.exit(runner_main(RUNNERS))
