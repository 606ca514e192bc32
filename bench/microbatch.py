"""Cross-prompt micro-batching on CPU: does packing K images into one UNet call raise images per second?

Run: nice -n 5 .venv/bin/python bench/microbatch.py --variants sd15 --sizes 256 --packs 1,2,4 --repeats 8
     nice -n 5 .venv/bin/python bench/microbatch.py --sizes 256 --packs 4 --pipeline-steps 8 --repeats 3
(the first run builds and converts the full-size random-weight model under /tmp/darkroom-bench-models, 2-3 min.)

The UNet is darkroom's own IR of a full-size SD-1.5-shaped (or BK-SDM-Small-shaped) model, reshaped to static
shapes and compiled with a worker's settings (workers/runtime/device.py compile_config: PERFORMANCE_HINT=LATENCY, the
device's default precision, bf16 here), exactly as workers/pipelines/sd.py does for one image, but with a batch of 2K
(K images, each with its uncond and cond halves under classifier-free guidance). The K variants are timed
interleaved, round by round, so the machine's noise hits them alike. Reported: median seconds per UNet call,
per image-step, images per second relative to K=1, and whether each image's slice of a packed call equals its
own unpacked call bit for bit (what byte-identical packed rendering would need). Writes bench/results/microbatch.json.

With --pipeline-steps N it times the whole pipeline instead: K images by workers/pipelines/sd.py generate() one by
one vs
the same K images packed (generate_packed below: one UNet call per step for all K; text encoding, seeds,
schedulers and VAE decoding stay per image), checks the images are byte-identical, and writes
bench/results/microbatch_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

TOKENS = 77


def compile_unet(core: Any, ir: Path, pack: int, side: int, context: int, cache: Path) -> Any:
    """The UNet reshaped for `pack` images under CFG (batch 2*pack) and compiled as a worker compiles it."""
    from workers.pipelines.sd import read_static
    from workers.runtime.device import compile_config

    batch = 2 * pack
    model = read_static(core, ir / "unet", {"sample": [batch, 4, side, side],
                                             "encoder_hidden_states": [batch, TOKENS, context]})
    return core.compile_model(model, "CPU", compile_config("CPU", cache_dir=cache))


def packed_inputs(images: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """diffusers' layout for several prompts under CFG: [uncond_1..uncond_K, cond_1..cond_K]."""
    return {
        "sample": np.concatenate([i["sample"][:1] for i in images] + [i["sample"][1:] for i in images]),
        "encoder_hidden_states": np.concatenate([i["states"][:1] for i in images] + [i["states"][1:] for i in images]),
        "timestep": np.asarray([500.0], dtype=np.float32),
    }


def measure(variant: str, size: int, packs: list[int], repeats: int, work: Path) -> dict[str, Any]:
    import openvino as ov
    from fullsize import fullsize_model, unet_config

    _, ir = fullsize_model(variant, work)  # type: ignore[arg-type]
    side, context = size // 8, unet_config(variant)["cross_attention_dim"]  # type: ignore[arg-type]
    core = ov.Core()
    rng = np.random.default_rng(0)
    images = [{"sample": rng.standard_normal((2, 4, side, side), dtype=np.float32),
               "states": rng.standard_normal((2, TOKENS, context), dtype=np.float32)} for _ in range(max(packs))]
    with tempfile.TemporaryDirectory(prefix="darkroom-mb-") as tmp:
        compiled = {}
        for k in packs:
            t0 = time.perf_counter()
            compiled[k] = compile_unet(core, ir, k, side, context, Path(tmp))
            print(f"{variant} {size}: compiled K={k} (batch {2 * k}) in {time.perf_counter() - t0:.1f} s", flush=True)
        requests = {k: c.create_infer_request() for k, c in compiled.items()}
        inputs = {k: packed_inputs(images[:k]) for k in packs}
        # Bit-exactness: each image's slice of a packed call vs the same image alone (K=1).
        single = requests[packs[0]] if packs[0] == 1 else compiled[1].create_infer_request()
        alone = []
        for i in range(max(packs)):
            single.infer(packed_inputs([images[i]]))
            alone.append(single.get_output_tensor(0).data.copy())
        exact: dict[int, dict[str, float | bool]] = {}
        for k in packs:
            requests[k].infer(inputs[k])  # also the warm-up
            out = requests[k].get_output_tensor(0).data
            diffs = [max(float(np.abs(out[i] - alone[i][0]).max()), float(np.abs(out[k + i] - alone[i][1]).max()))
                     for i in range(k)]
            exact[k] = {"identical": max(diffs) == 0.0, "max_abs_diff": max(diffs)}
            requests[k].infer(inputs[k])
        times: dict[int, list[float]] = {k: [] for k in packs}
        for r in range(repeats):
            order = packs[r % len(packs):] + packs[:r % len(packs)]  # rotate who goes first
            for k in order:
                t0 = time.perf_counter()
                requests[k].infer(inputs[k])
                times[k].append(time.perf_counter() - t0)
            print(f"  round {r + 1}/{repeats}: " + ", ".join(f"K={k} {times[k][-1]:.3f} s" for k in packs), flush=True)
        del requests, compiled
    base = statistics.median(times[packs[0]]) / packs[0]
    rows = {}
    for k in packs:
        call = statistics.median(times[k])
        # Also the ratio within each round (K=1 and K timed back to back), whose median resists slow spells.
        paired = statistics.median(a / (b / k) for a, b in zip(times[packs[0]], times[k], strict=True))
        rows[str(k)] = {"batch": 2 * k, "call_median_s": round(call, 4), "per_image_step_s": round(call / k, 4),
                        "images_per_s_ratio": round(base / (call / k), 3), "paired_ratio_median": round(paired, 3),
                        "times_s": [round(t, 4) for t in times[k]], **exact[k]}
    return {"variant": variant, "size": size, "repeats": repeats, "packs": rows}


def generate_packed(pipe: Any, unet: Any, items: list[tuple[str, str, int]], *, steps: int, guidance_scale: float,
                    scheduler: str) -> list[np.ndarray]:
    """K images through darkroom's pipeline with one UNet call per step for all of them (CFG on).

    Everything but the UNet call is generate()'s own code per image: text encoding, the seeded generator and
    initial latents, a scheduler each, guidance, VAE decode. Layout: [uncond_1..uncond_K, cond_1..cond_K].
    """
    import torch

    from workers.pipelines.schedulers import make_scheduler

    with torch.inference_mode():
        contexts = [pipe._encode([negative, prompt]) for prompt, negative, _ in items]
        scheds = [make_scheduler(scheduler, pipe.scheduler_config) for _ in items]
        generators = [torch.Generator("cpu").manual_seed(seed) for _, _, seed in items]
        latents = []
        for sched, generator in zip(scheds, generators, strict=True):
            sched.set_timesteps(steps)
            latents.append(torch.randn(pipe.latent_shape, generator=generator, dtype=torch.float32)
                           * sched.init_noise_sigma)
        context = np.concatenate([c[h:h + 1] for h in (0, 1) for c in contexts])
        k = len(items)
        for t in scheds[0].timesteps:
            inputs = [sched.scale_model_input(torch.cat([lat] * 2), t) for sched, lat in zip(scheds, latents,
                                                                                            strict=True)]
            sample = torch.cat([x[h:h + 1] for h in (0, 1) for x in inputs]).numpy()
            out = torch.from_numpy(unet("out_sample", sample=sample, encoder_hidden_states=context,
                                        timestep=np.asarray([t.item()], dtype=unet.input_dtype("timestep"))))
            for i, sched in enumerate(scheds):
                uncond, text = out[i:i + 1], out[k + i:k + i + 1]
                noise_pred = uncond + guidance_scale * (text - uncond)
                latents[i] = sched.step(noise_pred, t, latents[i], return_dict=False)[0]  # PNDM: no eta, no noise
        return [pipe._decode(lat) for lat in latents]


def measure_pipeline(variant: str, size: int, pack: int, steps: int, repeats: int, work: Path) -> dict[str, Any]:
    """The whole pipeline in-process: K images one by one (generate) vs as one pack (generate_packed)."""
    import openvino as ov
    from fullsize import fullsize_model, unet_config

    from workers.pipelines.sd import CompiledModel, OVStableDiffusion
    from workers.runtime.device import compile_config

    _, ir = fullsize_model(variant, work)  # type: ignore[arg-type]
    params = {"steps": steps, "guidance_scale": 7.5, "scheduler": "pndm"}
    items = [(f"a photo of a lighthouse, variant {i}", "blurry" if i % 2 else "", 1000 + i) for i in range(pack)]
    with tempfile.TemporaryDirectory(prefix="darkroom-mb-") as tmp:
        config = compile_config("CPU", cache_dir=Path(tmp))
        one = OVStableDiffusion.load(ir, width=size, height=size, cfg=True, ov_config=config)
        context = unet_config(variant)["cross_attention_dim"]  # type: ignore[arg-type]
        unet = CompiledModel(compile_unet(ov.Core(), ir, pack, size // 8, context, Path(tmp)))
        one.generate("warm-up", seed=0, **{**params, "steps": 1})
        generate_packed(one, unet, items, **{**params, "steps": 1})
        singles: list[float] = []
        packed: list[float] = []
        identical = True
        for r in range(repeats):
            for arm in (("one", "many") if r % 2 == 0 else ("many", "one")):
                t0 = time.perf_counter()
                if arm == "one":
                    alone = [one.generate(p, negative_prompt=n, seed=s, **params).image for p, n, s in items]
                    singles.append((time.perf_counter() - t0) / pack)
                else:
                    together = generate_packed(one, unet, items, **params)
                    packed.append((time.perf_counter() - t0) / pack)
            identical = identical and all(a.tobytes() == b.tobytes() for a, b in zip(alone, together, strict=True))
            print(f"  round {r + 1}/{repeats}: one by one {singles[-1]:.2f} s/image, "
                  f"packed x{pack} {packed[-1]:.2f} s/image", flush=True)
    one_s, many_s = statistics.median(singles), statistics.median(packed)
    return {"variant": variant, "size": size, "pack": pack, "steps": steps, "repeats": repeats,
            "one_by_one_s_per_image": round(one_s, 3), "packed_s_per_image": round(many_s, 3),
            "images_per_s_ratio": round(one_s / many_s, 3),
            "paired_ratio_median": round(statistics.median(a / b for a, b in zip(singles, packed, strict=True)), 3),
            "byte_identical": identical,
            "one_by_one_times": [round(t, 3) for t in singles], "packed_times": [round(t, 3) for t in packed]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="sd15", help="sd15 and/or bksdm-small, comma-separated")
    parser.add_argument("--sizes", default="256", help="image sides, comma-separated")
    parser.add_argument("--packs", default="1,2,4", help="images per UNet call (batch 2K under CFG)")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/darkroom-bench-models"))
    parser.add_argument("--pipeline-steps", type=int, default=0,
                        help="instead: the whole pipeline with this many steps, one by one vs packed (largest K)")
    args = parser.parse_args()
    if args.pipeline_steps:
        return main_pipeline(args)
    packs = sorted({int(k) for k in args.packs.split(",")} | {1})
    runs = [measure(v, int(s), packs, args.repeats, args.work_dir)
            for v in args.variants.split(",") for s in args.sizes.split(",")]
    result = {"cpu_affinity": len(os.sched_getaffinity(0)), "runs": runs}
    out = REPO / "bench" / "results" / "microbatch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for run in runs:
        print(f"\n{run['variant']} UNet, {run['size']}x{run['size']}, CFG, "
              f"median of {run['repeats']} interleaved rounds")
        print(f"{'K images':>9} {'batch':>6} {'s/call':>8} {'s/image-step':>13} {'images/s vs K=1':>16} "
              f"{'per-round ratio':>16} {'bit-exact':>10}")
        for k, row in run["packs"].items():
            print(f"{k:>9} {row['batch']:>6} {row['call_median_s']:>8.3f} {row['per_image_step_s']:>13.3f} "
                  f"{row['images_per_s_ratio']:>16.3f} {row['paired_ratio_median']:>16.3f} {str(row['identical']):>10}")
    print(f"wrote {out}")
    return 0


def main_pipeline(args: argparse.Namespace) -> int:
    pack = max(int(k) for k in args.packs.split(","))
    runs = [measure_pipeline(v, int(s), pack, args.pipeline_steps, args.repeats, args.work_dir)
            for v in args.variants.split(",") for s in args.sizes.split(",")]
    out = REPO / "bench" / "results" / "microbatch_pipeline.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu_affinity": len(os.sched_getaffinity(0)), "runs": runs}, indent=2))
    for run in runs:
        print(f"\n{run['variant']} pipeline, {run['size']}x{run['size']}, {run['steps']} steps, CFG, "
              f"median of {run['repeats']} interleaved rounds")
        print(f"one by one       {run['one_by_one_s_per_image']:8.2f} s/image")
        print(f"packed x{run['pack']}        {run['packed_s_per_image']:8.2f} s/image  images/s ratio "
              f"{run['images_per_s_ratio']:.3f} (per round {run['paired_ratio_median']:.3f})  "
              f"byte-identical {run['byte_identical']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
