"""N pinned workers vs one: images per hour through the real queue, two 1-core workers vs one 2-core worker.

Run: nice -n 5 .venv/bin/python bench/throughput.py --variant sd15 --size 256 --steps 10 --images 6 --rounds 2
(the first run builds and converts the full-size random-weight model under /tmp/darkroom-bench-models.)

Real parts: an embedded Redis, SeaweedFS S3 storage, real `darkroom worker` processes with their default settings
(bf16 on this CPU, shared compiled-blob cache). "one" is `darkroom worker --cores 0-1`; "two" is
`darkroom worker --cores 0` plus `darkroom worker --cores 1`, both on one queue. Each round starts the
configuration's workers, warms each one up with an image, then times a batch of --images queued at once (submit
to the manifest written), and stops them; the configurations alternate, the first swapping each round, so the
machine's noise hits both alike. Reported: median images per hour and the ratio two/one. Writes
bench/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

CONFIGS: dict[str, list[str]] = {"one": ["0-1"], "two": ["0", "1"]}


def run_config(rig: Any, name: str, args: argparse.Namespace, round_no: int) -> dict[str, Any]:
    queue = f"tp-{name}-{round_no}"
    workers = [rig.worker(f"{name}-{round_no}-{i}", [queue], cores=cores) for i, cores in enumerate(CONFIGS[name])]
    try:
        for w in workers:
            w.start(timeout=300)
        # Warm every worker: as many images as workers, until each has rendered one (prefetch 1 spreads them).
        warmed: set[str] = set()
        for attempt in range(4):
            _, summary = rig.render(queue, len(workers), steps=1, size=args.size, seed=900 + attempt)
            warmed |= {str(i.worker) for i in summary.items}
            if len(warmed) >= len(workers):
                break
        seconds, summary = rig.render(queue, args.images, steps=args.steps, size=args.size, seed=round_no)
    finally:
        for w in workers:
            w.stop()
    per_worker = Counter(str(i.worker) for i in summary.items)
    row = {"config": name, "round": round_no, "seconds": round(seconds, 2),
           "images_per_hour": round(args.images / seconds * 3600, 1),
           "item_seconds_median": round(statistics.median(i.seconds or 0 for i in summary.items), 2),
           "per_worker": sorted(per_worker.values())}
    print(f"  round {round_no} {name}: {seconds:.1f} s for {args.images} images = {row['images_per_hour']:.0f} "
          f"images/h (per worker {row['per_worker']}, item median {row['item_seconds_median']} s)", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sd15", choices=["sd15", "bksdm-small"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=6, help="per timed batch; even, so two workers split it")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/darkroom-bench-models"))
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit("needs cores 0 and 1")

    from queue_rig import queue_rig

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="darkroom-tp-") as tmp, \
            queue_rig(Path(tmp), args.variant, args.work_dir) as rig:
        for r in range(args.rounds):
            for name in (("one", "two") if r % 2 == 0 else ("two", "one")):
                rows.append(run_config(rig, name, args, r))
    one = statistics.median(row["images_per_hour"] for row in rows if row["config"] == "one")
    two = statistics.median(row["images_per_hour"] for row in rows if row["config"] == "two")
    result = {"variant": args.variant, "size": args.size, "steps": args.steps, "images": args.images,
              "rounds": args.rounds, "one_worker_cores_0_1_images_per_hour": one,
              "two_workers_1_core_each_images_per_hour": two, "ratio_two_over_one": round(two / one, 3),
              "runs": rows}
    out = REPO / "bench" / "results" / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{args.variant}, {args.size}x{args.size}, {args.steps} steps, CFG, {args.images} images per batch, "
          f"median of {args.rounds} interleaved rounds, through Redis + S3 + real workers")
    print(f"one worker, --cores 0-1            {one:8.0f} images/hour")
    print(f"two workers, --cores 0 / --cores 1 {two:8.0f} images/hour   ratio {two / one:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
