"""Batch control on the real queue: how long from `darkroom cancel` to every worker idle, on a big queued batch.

An embedded Redis, local storage, the tiny model, and real `darkroom worker` processes (testkit/fleet.py). Each
run submits --items images, waits until the workers are rendering it, cancels it, and times: the cancel call
itself, the batch reaching state `cancelled` (what `wait()` returns), and the last worker going idle (the queue
empty and no message in flight). Prints the CPU and OpenVINO's default precision, the per-run figures and their
medians, and writes bench/results/control.json.

    .venv/bin/python bench/control.py --items 1000 --workers 2 --runs 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
QUEUE = "bench-control"


def machine() -> dict[str, str]:
    """The CPU model and the flags that decide OpenVINO's precision, and the precision it picks."""
    import openvino as ov

    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    return {"cpu": fields.get("Model name", platform.processor()).strip(),
            "flags": " ".join(f for f in wanted if f in flags), "ov_precision": precision}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    from broker.embedded import EmbeddedRedis
    from broker.settings import Settings
    from darkroom import submit, submit_convert
    from testkit.fleet import WorkerProcess
    from testkit.tiny_models import build_tiny_sd

    about = machine()
    print(f"CPU: {about['cpu']} ({about['flags']}); OpenVINO default precision: {about['ov_precision']}")
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-control-") as tmp:
        root = Path(tmp)
        redis_server = EmbeddedRedis.start(data_dir=root / "redis")
        settings = Settings(broker_url=redis_server.url, storage_url=str(root / "storage"), cache_dir=root / "cache")
        workers = [WorkerProcess(settings, [QUEUE, "convert"], root / f"worker-{i}.log")
                   for i in range(args.workers)]
        try:
            for worker in workers:
                worker.start()
            source = build_tiny_sd(root / "tiny", seed=0)
            submit_convert(str(source), name="bench", settings=settings).get(timeout=900)
            render = {"model": "bench", "steps": args.steps, "width": args.size, "height": args.size,
                      "queue": QUEUE, "settings": settings}
            # Every worker warm: the model compiled in each pool process before anything is timed.
            submit([f"warm-up {i}" for i in range(2 * args.workers)], seed=0, **render).wait(timeout=900)
            runs = [_cancel_run(i, args.items, render, settings) for i in range(args.runs)]
            waits = [_priority_run(i, args.items, render, settings) for i in range(args.runs)]
        finally:
            for worker in workers:
                worker.stop()
            redis_server.stop()
    summary = {k: round(statistics.median(r[k] for r in runs), 3)
               for k in ("cancel_call_s", "to_cancelled_s", "to_idle_s")}
    priority = {k: round(statistics.median(w[k] for w in waits), 2) for k in ("high_done_s", "image_s", "image_times")}
    print(f"median of {args.runs}: a 2-item high batch behind {args.items} low items finished "
          f"{priority['high_done_s']:.2f} s after its submission = {priority['image_times']:.2f} image-times "
          f"({priority['image_s']:.3f} s per image per worker)")
    print(f"median of {args.runs}: cancel call {summary['cancel_call_s']:.3f} s, batch cancelled "
          f"{summary['to_cancelled_s']:.3f} s, last worker idle {summary['to_idle_s']:.3f} s "
          f"({args.items} items, {args.workers} workers)")
    out = REPO / "bench" / "results" / "control.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": about, "args": vars(args), "runs": runs, "median": summary,
                                       "priority_runs": waits, "priority_median": priority}, indent=1))
    return 0


def _priority_run(run: int, items: int, render: dict[str, Any], settings: Any) -> dict[str, Any]:
    """A 2-item high batch submitted behind `items` low ones: how long until both its images are done, in seconds
    and in image-times (the median seconds one worker took per image of the low batch)."""
    from darkroom import submit
    from darkroom.steering import cancel

    # Images long enough (20 steps) that the queue's own latency is small beside them.
    render = {**render, "steps": max(render["steps"], 20)}
    low = submit([f"a low lighthouse, take {run}-{i}" for i in range(items)], seed=run, priority="low", **render)
    while low.counts().done < 4:
        time.sleep(0.02)
    handle = submit([f"an urgent lighthouse, take {run}-{i}" for i in range(2)], seed=run, priority="high",
                    **render)
    started = time.perf_counter()  # from the moment its messages are in the queue
    high = handle.wait(timeout=600, poll=0.01)
    high_done = time.perf_counter() - started
    per_image = statistics.median(i.seconds for i in low.summary().items if i.status == "done" and i.seconds)
    cancel(low.batch_id, settings=settings)
    low.wait(timeout=600)
    # Two workers: each high image starts when a worker's current image ends (half an image on average), then
    # takes one image: about 1.5 image-times plus the queue's latency.
    row = {"high_done_s": round(high_done, 3), "image_s": round(per_image, 4),
           "image_times": round(high_done / per_image, 2), "high_state": high.state}
    print(f"priority run {run + 1}: {row}", flush=True)
    return row


def _cancel_run(run: int, items: int, render: dict[str, Any], settings: Any) -> dict[str, Any]:
    import redis

    from darkroom import submit
    from darkroom.steering import cancel

    client = redis.Redis.from_url(settings.broker_url)
    handle = submit([f"a lighthouse, take {run}-{i}" for i in range(items)], seed=run, **render)
    # 1. The workers busy on the batch: a few items done.
    while handle.counts().done < 2:
        time.sleep(0.02)
    # 2. Cancel, then the batch's final state, then the queue drained with nothing in flight.
    started = time.perf_counter()
    result = cancel(handle.batch_id, settings=settings)
    called = time.perf_counter() - started
    summary = handle.wait(timeout=600, poll=0.02)
    cancelled = time.perf_counter() - started
    while client.llen(QUEUE) or client.hlen("unacked"):
        time.sleep(0.02)
    idle = time.perf_counter() - started
    client.close()
    row = {"cancel_call_s": round(called, 3), "to_cancelled_s": round(cancelled, 3), "to_idle_s": round(idle, 3),
           "recorded_by_cancel": result.items, "done_before": summary.done, "state": summary.state}
    print(f"run {run + 1}: {row}", flush=True)
    return row


if __name__ == "__main__":
    raise SystemExit(main())
