"""Where one image's time goes: text encoder, UNet loop, VAE decode, at 256x256 and 512x512.

Run: nice -n 5 .venv/bin/python bench/phases.py --variant sd15 --sizes 256,512 --steps 4 --repeats 3
(the first run builds and converts the full-size random-weight model under /tmp/darkroom-bench-models.)

darkroom's own pipeline (workers/pipelines/sd.py OVStableDiffusion) compiled with a worker's settings, its per-image
timings (GenerationResult.timings, what metrics.observe_image records): encode (CLIP text encoder, batch 2 under
CFG), denoise (the UNet loop), decode (VAE decoder). The sizes are timed interleaved. Encode and decode do not
depend on the step count, so the shares are given for the measured steps and projected to 20 steps from the
measured per-step time. Writes bench/results/phases.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="sd15", choices=["sd15", "bksdm-small"])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--project-steps", type=int, default=20)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/darkroom-bench-models"))
    args = parser.parse_args()

    from fullsize import fullsize_model

    from workers.pipelines.sd import OVStableDiffusion
    from workers.runtime.device import compile_config

    _, ir = fullsize_model(args.variant, args.work_dir)  # type: ignore[arg-type]
    sizes = [int(s) for s in args.sizes.split(",")]
    params = {"guidance_scale": 7.5, "scheduler": "pndm"}
    timings: dict[int, list[dict[str, float]]] = {s: [] for s in sizes}
    with tempfile.TemporaryDirectory(prefix="darkroom-phases-") as tmp:
        config = compile_config("CPU", cache_dir=Path(tmp))
        pipes = {s: OVStableDiffusion.load(ir, width=s, height=s, cfg=True, ov_config=config) for s in sizes}
        for pipe in pipes.values():
            pipe.generate("warm-up", seed=0, steps=1, **params)
        for r in range(args.repeats):
            for s in sizes[r % len(sizes):] + sizes[:r % len(sizes)]:
                out = pipes[s].generate(f"a lighthouse on a cliff, take {r}", negative_prompt="blurry", seed=r,
                                        steps=args.steps, **params)
                timings[s].append(out.timings)
                t = out.timings
                print(f"  round {r + 1} {s}x{s}: encode {t['encode']:.3f} s, denoise {t['denoise']:.2f} s "
                      f"({t['denoise'] / args.steps:.2f} s/step), decode {t['decode']:.2f} s, "
                      f"total {t['total']:.2f} s", flush=True)
    rows: dict[str, dict[str, Any]] = {}
    for s in sizes:
        med = {k: statistics.median(t[k] for t in timings[s]) for k in ("encode", "denoise", "decode", "total")}
        step = med["denoise"] / args.steps
        projected = med["encode"] + args.project_steps * step + med["decode"]
        rows[str(s)] = {
            "encode_s": round(med["encode"], 4), "step_s": round(step, 4), "decode_s": round(med["decode"], 3),
            "total_s": round(med["total"], 3), "decode_in_steps": round(med["decode"] / step, 2),
            "measured_share": {k: round(med[k] / med["total"], 4) for k in ("encode", "denoise", "decode")},
            f"projected_{args.project_steps}_steps_s": round(projected, 2),
            f"projected_{args.project_steps}_steps_share": {
                "encode": round(med["encode"] / projected, 4),
                "denoise": round(args.project_steps * step / projected, 4),
                "decode": round(med["decode"] / projected, 4)},
        }
    result = {"variant": args.variant, "steps": args.steps, "repeats": args.repeats, "sizes": rows}
    out_path = REPO / "bench" / "results" / "phases.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2))
    n = args.project_steps
    print(f"\n{args.variant} pipeline, CFG, medians of {args.repeats} interleaved rounds at {args.steps} steps")
    print(f"{'size':>8} {'encode s':>9} {'s/step':>7} {'decode s':>9} {'decode/step':>12} "
          f"{f'encode % @{n}':>11} {f'decode % @{n}':>11}")
    for s, row in rows.items():
        share = row[f"projected_{n}_steps_share"]
        print(f"{s:>8} {row['encode_s']:>9.3f} {row['step_s']:>7.2f} {row['decode_s']:>9.2f} "
              f"{row['decode_in_steps']:>12.2f} {100 * share['encode']:>11.2f} {100 * share['decode']:>11.2f}")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
