"""How much the adherence gate's score moves for reasons other than drift: the numbers behind its 480-image set.

Renders the gate's set (the 12 grid prompts x N seeds) with a converted demo-model IR folder in f32 (the gate's
FP32 reference), as served (the device's default precision, bf16 on AVX-512-bf16 CPUs), and with INT8 copies
made by darkroom's own calibration, and prints each score with the images lost and gained against f32.

    .venv/bin/python bench/gate_noise.py IR_DIR --seeds 40 --modes weights-int8,hybrid
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import workers.demo_model.adherence as adherence  # noqa: E402
from workers.calibrate.quantize import calibrate_sd  # noqa: E402
from workers.demo_model.scorer import find_scorer  # noqa: E402

CALIBRATION_PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ir_dir", type=Path, help="a converted demo-model IR folder (with scorer/)")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--modes", default="weights-int8,hybrid", help="INT8 modes to calibrate and score")
    args = parser.parse_args()
    scorer = find_scorer(args.ir_dir)
    if scorer is None:
        print(f"{args.ir_dir}: no scorer/ folder (not a demo-model IR)", file=sys.stderr)
        return 2
    adherence.ADHERENCE_SEEDS = tuple(range(1000, 1000 + args.seeds))

    def run(ir: Path, config: dict[str, str] | None) -> tuple[float, list[bool], float]:
        started = time.perf_counter()
        result = adherence.render_and_score(ir, scorer_dir=scorer, ov_config=config)
        return result.accuracy, [i["correct"] for i in result.summary["items"]], time.perf_counter() - started

    base = run(args.ir_dir, {"INFERENCE_PRECISION_HINT": "f32"})
    print(f"f32 (reference)  {base[0]:6.2f}%  {base[2]:.0f} s", flush=True)

    def compare(name: str, other: tuple[float, list[bool], float]) -> None:
        lost = sum(1 for a, b in zip(base[1], other[1], strict=True) if a and not b)
        gained = sum(1 for a, b in zip(base[1], other[1], strict=True) if b and not a)
        print(f"{name:<16} {other[0]:6.2f}%  {other[2]:.0f} s  lost {lost}, gained {gained}, "
              f"drop {base[0] - other[0]:.2f} points", flush=True)

    compare("as served", run(args.ir_dir, None))
    with tempfile.TemporaryDirectory() as tmp:
        for mode in filter(None, args.modes.split(",")):
            out = Path(tmp) / mode
            calibrate_sd(args.ir_dir, out, CALIBRATION_PROMPTS, mode=mode, steps=3, width=64, height=64,
                         subset_size=None if mode == "weights-int8" else 2)
            compare(mode, run(out, None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
