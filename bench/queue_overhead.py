"""Queue overhead: per-image time through Redis and a real worker vs the same pipeline in-process.

Run: .venv/bin/python bench/queue_overhead.py [--images 20] [--steps 20] [--size 64]
Prints medians and their ratio, measured side by side in one run, and writes bench/results/queue_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    from broker.embedded import EmbeddedRedis
    from broker.settings import Settings
    from darkroom import submit, submit_convert
    from testkit.fleet import WorkerProcess
    from testkit.tiny_models import build_tiny_sd
    from workers.convert.sd import convert_sd
    from workers.pipelines.sd import OVStableDiffusion
    from workers.runtime.device import compile_config

    with tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp:
        root = Path(tmp)
        source = build_tiny_sd(root / "tiny", seed=0)
        params = {"steps": args.steps, "guidance_scale": 7.5, "scheduler": "pndm"}

        # 1. In-process: the same pipeline class a worker uses, compiled once, warmed up.
        ir = convert_sd(source, root / "ir", weight_format="fp16").out_dir
        pipe = OVStableDiffusion.load(ir, device="CPU", width=args.size, height=args.size, cfg=True,
                                      ov_config=compile_config("CPU", cache_dir=root / "ov-cache"))
        pipe.generate("warm-up", seed=0, **params)
        inproc = []
        for i in range(args.images):
            t0 = time.perf_counter()
            pipe.generate(f"prompt {i}", seed=i, **params)
            inproc.append(time.perf_counter() - t0)

        # 2. Through the queue: embedded Redis, local storage, one warm worker; one image at a time.
        redis = EmbeddedRedis.start()
        settings = Settings(broker_url=redis.url, storage_url=str(root / "storage"), cache_dir=root / "cache")
        worker = WorkerProcess(settings, ["generate.CPU", "convert"], root / "worker.log")
        try:
            worker.start()
            submit_convert(str(source), name="bench", settings=settings).get(timeout=600)
            submit(["warm-up"], model="bench", seed=0, steps=args.steps, width=args.size, height=args.size,
                   settings=settings).wait(timeout=600, poll=0.002)
            queued = []
            for i in range(args.images):
                t0 = time.perf_counter()
                submit([f"prompt {i}"], model="bench", seed=i, steps=args.steps, width=args.size,
                       height=args.size, settings=settings).wait(timeout=600, poll=0.002)
                queued.append(time.perf_counter() - t0)
            # 3. Throughput: a whole batch queued at once, so the worker never waits for the producer.
            t0 = time.perf_counter()
            submit([f"batch prompt {i}" for i in range(args.images)], model="bench", seed=1, steps=args.steps,
                   width=args.size, height=args.size, settings=settings).wait(timeout=1800, poll=0.01)
            batch_per_image = (time.perf_counter() - t0) / args.images
        finally:
            worker.stop()
            redis.stop()

    result = {
        "images": args.images, "steps": args.steps, "size": args.size,
        "in_process_median_s": statistics.median(inproc),
        "queue_round_trip_median_s": statistics.median(queued),
        "queue_batch_per_image_s": batch_per_image,
    }
    result["round_trip_ratio"] = result["queue_round_trip_median_s"] / result["in_process_median_s"]
    result["batch_ratio"] = batch_per_image / result["in_process_median_s"]
    result["round_trip_overhead_ms"] = 1000 * (result["queue_round_trip_median_s"] - result["in_process_median_s"])
    out = REPO / "bench" / "results" / "queue_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"tiny SD, {args.size}x{args.size}, {args.steps} steps, {args.images} images, one CPU worker")
    print(f"in-process pipeline            median {result['in_process_median_s'] * 1000:8.1f} ms/image")
    print(f"through the queue, one by one  median {result['queue_round_trip_median_s'] * 1000:8.1f} ms/image "
          f"(ratio {result['round_trip_ratio']:.3f}, +{result['round_trip_overhead_ms']:.1f} ms)")
    print(f"through the queue, as a batch         {batch_per_image * 1000:8.1f} ms/image "
          f"(ratio {result['batch_ratio']:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
