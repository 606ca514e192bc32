"""Score a demo-model folder on the 48-image grid the shipped-model test uses, in-process (no queue).

The same prompts, seeds (batch seed 2026, seeds derived as the producer does), 20 steps and scheduler (the
model's own) as tests/test_demo_model.py; used to score the stages of a training run and to compare schedulers. Example:

    .venv/bin/python bench/demo_grid.py darkroom/data/demo-model --guidance 6
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.seeds import derive_seed  # noqa: E402
from workers.demo_model import shapes  # noqa: E402
from workers.demo_model.adherence import sheet  # noqa: E402
from workers.demo_model.scorer import ShapeClassifier, judge, summarise  # noqa: E402
from workers.pipelines.schedulers import native_scheduler  # noqa: E402

BATCH_SEED = 2026
IMAGES_PER_PROMPT = 4


def main() -> None:
    import numpy as np

    from workers.convert.sd import convert_sd
    from workers.pipelines.sd import OVStableDiffusion

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a demo-model diffusers folder (with scorer/)")
    parser.add_argument("--guidance", type=float, default=6.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheduler", help="a scheduler name a request may use (default: the model's own, as the "
                                            "queue uses it)")
    parser.add_argument("--batch-seed", type=int, default=BATCH_SEED,
                        help=f"the batch seed the images' seeds derive from (default {BATCH_SEED}, the test's grid; "
                             "another value gives a held-out set of seeds)")
    parser.add_argument("--sheet", type=Path, help="write the 48 images as a contact sheet here")
    args = parser.parse_args()
    args.scheduler = args.scheduler or native_scheduler(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        ir = convert_sd(args.model, Path(tmp) / "ir", weight_format="fp32").out_dir
        pipe = OVStableDiffusion.load(Path(ir), width=64, height=64, cfg=True)
        prompts = [p for p in shapes.grid_prompts() for _ in range(IMAGES_PER_PROMPT)]
        images = [np.asarray(pipe.generate(p, steps=args.steps, guidance_scale=args.guidance, scheduler=args.scheduler,
                                           seed=derive_seed(args.batch_seed, i)).image) for i, p in enumerate(prompts)]
    result = summarise(judge(images, prompts, ShapeClassifier(args.model / "scorer")))
    print(f"accuracy {result['accuracy']}% ({result['correct']}/{result['scored']}), guidance {args.guidance}, "
          f"batch seed {args.batch_seed}, scheduler {args.scheduler}, {args.steps} steps")
    print(json.dumps({k: v["accuracy"] for k, v in result["per_prompt"].items()}))
    print("wrong:", [(i["prompt"], i["seen"]) for i in result["items"] if not i["correct"]])
    if args.sheet:
        args.sheet.write_bytes(sheet(images, columns=12))


if __name__ == "__main__":
    main()
