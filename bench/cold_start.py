"""Cold start: a fresh worker process's first image vs a warm image, with and without the shared blob cache.

Run: nice -n 5 .venv/bin/python bench/cold_start.py --variant sd15 --size 256 --steps 10 --rounds 2
(the first run builds and converts the full-size random-weight model under /tmp/darkroom-bench-models.)

Real parts: an embedded Redis, SeaweedFS S3 storage, real `darkroom worker` processes. Priming workers render
one image first, which compiles the model and pushes OpenVINO's compiled blobs to storage
(workers/runtime/blob_cache.py):
one with the weightless cache workers use on CPU (CACHE_MODE=OPTIMIZE_SIZE: blobs without weights), one with
DARKROOM_WEIGHTLESS_CACHE=0 (full blobs, as big as the IR: the mode before). Then, per round, in rotating
order, one image is queued and a worker process is started:

- shared:       a new machine (empty DARKROOM_CACHE_DIR) with DARKROOM_SHARE_COMPILED_CACHE=1: it downloads the
                IR and the weightless blobs from storage and imports them, mapping the weights from the IR;
- shared-full:  the same with full blobs (DARKROOM_WEIGHTLESS_CACHE=0);
- no-share:     a new machine with DARKROOM_SHARE_COMPILED_CACHE=0: it downloads the IR and compiles;
- restart:      the weightless priming worker's machine (IR and blobs on local disk), restarted;
- restart-full: the full-blob priming worker's machine, restarted.

"first image" is from starting the worker process to the image's record being counted (the producer sees it);
"warm image" is one more image on that worker, submit to done. Goal: first <= 2x warm with the shared cache.
Writes bench/results/cold_start.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

SCENARIOS = ("shared", "shared-full", "no-share", "restart", "restart-full")
FULL_BLOBS = {"DARKROOM_WEIGHTLESS_CACHE": "0"}


def cold_run(rig: Any, scenario: str, args: argparse.Namespace, round_no: int) -> dict[str, Any]:
    from darkroom import submit

    queue = f"cold-{scenario}-{round_no}"
    full = scenario.endswith("-full")
    if scenario.startswith("restart"):
        worker = rig.worker(f"{scenario}-{round_no}", [queue], cache_dir=rig.root / f"cache-prime{'-full' * full}")
    else:
        worker = rig.worker(f"{scenario}-{round_no}", [queue], cache_dir=rig.root / f"cache-{scenario}-{round_no}",
                            share_compiled_cache=scenario.startswith("shared"))
    if full:
        worker.extra_env = {**worker.extra_env, **FULL_BLOBS}
    handle = submit([f"a lighthouse at dawn, cold {scenario} {round_no}"], model="bench", seed=round_no,
                    steps=args.steps, width=args.size, height=args.size, queue=queue, settings=rig.settings)
    started = time.perf_counter()
    try:
        worker.start(timeout=600)
        ready = time.perf_counter() - started
        summary = handle.wait(timeout=1800, poll=0.05)
        first = time.perf_counter() - started
        assert summary.done == 1, summary
        warm, _ = rig.render(queue, 1, steps=args.steps, size=args.size, seed=100 + round_no)
    finally:
        worker.stop()
        if not scenario.startswith("restart"):  # a new machine's cache: the IR (2 GB) and blobs, not kept
            shutil.rmtree(worker.settings.cache_dir, ignore_errors=True)
    log = worker.log_path.read_text(errors="replace")
    pulls = re.findall(r"pulled (\d+) blob\(s\), (\d+) bytes", log)
    pulled, pulled_mb = sum(int(n) for n, _ in pulls), sum(int(b) for _, b in pulls) / 1e6
    row = {"scenario": scenario, "round": round_no, "ready_s": round(ready, 2), "first_image_s": round(first, 2),
           "warm_image_s": round(warm, 2), "ratio": round(first / warm, 3), "blobs_pulled": pulled,
           "blobs_pulled_mb": round(pulled_mb, 1)}
    print(f"  round {round_no} {scenario:12}: answers ping after {ready:5.1f} s, first image {first:6.1f} s, "
          f"warm image {warm:6.1f} s, ratio {first / warm:.2f} (blobs pulled: {pulled}, {pulled_mb:.1f} MB)",
          flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sd15", choices=["sd15", "bksdm-small"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/darkroom-bench-models"))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {','.join(SCENARIOS)}")
    args = parser.parse_args()
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    if set(scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenario(s): {', '.join(sorted(set(scenarios) - set(SCENARIOS)))}")

    from queue_rig import queue_rig

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="darkroom-cold-") as tmp, \
            queue_rig(Path(tmp), args.variant, args.work_dir) as rig:
        primes = {"": {}} | ({"-full": FULL_BLOBS} if any(s.endswith("-full") for s in scenarios) else {})
        blob_mb: dict[str, float] = {}
        for suffix, env in primes.items():
            prime = rig.worker(f"prime{suffix}", [f"cold-prime{suffix}"], cache_dir=rig.root / f"cache-prime{suffix}")
            prime.extra_env = {**prime.extra_env, **env}
            try:
                prime.start(timeout=600)
                seconds, _ = rig.render(f"cold-prime{suffix}", 1, steps=1, size=args.size, seed=999)
            finally:
                prime.stop()
            blob_mb[f"prime{suffix}"] = round(sum(p.stat().st_size for p in (rig.root / f"cache-prime{suffix}")
                                                  .rglob("*.blob")) / 1e6, 1)
            print(f"priming worker{suffix or ' (weightless)'} compiled, rendered and pushed its blobs "
                  f"({blob_mb[f'prime{suffix}']} MB) in {seconds:.1f} s", flush=True)
        for r in range(args.rounds):
            order = scenarios[r % len(scenarios):] + scenarios[:r % len(scenarios)]  # rotate who goes first
            rows.extend(cold_run(rig, s, args, r) for s in order)
    summary: dict[str, Any] = {}
    for s in scenarios:
        mine = [row for row in rows if row["scenario"] == s]
        summary[s] = {k: round(statistics.median(row[k] for row in mine), 3)
                      for k in ("ready_s", "first_image_s", "warm_image_s", "ratio", "blobs_pulled_mb")}
    result = {"variant": args.variant, "size": args.size, "steps": args.steps, "rounds": args.rounds,
              "compiled_blobs_mb": blob_mb, "summary": summary, "runs": rows}
    out = REPO / "bench" / "results" / "cold_start.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{args.variant}, {args.size}x{args.size}, {args.steps} steps, CFG, medians of {args.rounds} "
          f"interleaved rounds, Redis + S3 + real worker processes")
    print(f"{'scenario':13} {'ready s':>8} {'first image s':>14} {'warm image s':>13} {'first/warm':>11} "
          f"{'blobs pulled MB':>16}")
    for s, m in summary.items():
        print(f"{s:13} {m['ready_s']:>8.1f} {m['first_image_s']:>14.1f} {m['warm_image_s']:>13.1f} "
              f"{m['ratio']:>11.2f} {m['blobs_pulled_mb']:>16.1f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
