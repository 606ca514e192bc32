"""`darkroom train-demo-model | score`: the built-in demo model and its prompt-adherence scorer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from darkroom.batches import batch_summary
from darkroom.cli_common import EXIT_INVALID, check_batch, fail, settings_of
from darkroom.demo_model import shipped_model_dir
from storage import open_storage


def add_demo_model_commands(sub: Any) -> None:
    p = sub.add_parser("train-demo-model", help="train the built-in shapes model (and its scorer) into OUT")
    p.add_argument("out", help="folder for the diffusers pipeline; checkpoints there make a rerun resume")
    p.add_argument("--minutes", type=float, default=30.0, help="time budget for the VAE and UNet (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, help="train exactly this many VAE steps instead of by time")
    p.add_argument("--unet-steps", type=int, help="train exactly this many UNet steps instead of by time")
    p.add_argument("--vae-from", metavar="MODEL",
                   help="use this pipeline's VAE (a folder or repo id) as it is and train only the UNet on it "
                        "(--minutes then all go to the UNet)")
    p.add_argument("--unet-cooldown-steps", type=int, default=0,
                   help="with --unet-steps: the last N steps lower the learning rate linearly to zero")
    p.add_argument("--scorer-steps", type=int, default=300)
    p.add_argument("--pool-size", type=int, default=12000, help="procedural training images")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest on a shared CPU)")
    p.set_defaults(func=cmd_train_demo_model)

    p = sub.add_parser("score", help="judge a batch's prompt adherence (demo-model grammar); writes adherence.json")
    p.add_argument("batch")
    p.add_argument("--scorer", metavar="DIR", help="the scorer folder (default: the shipped demo model's)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.set_defaults(func=cmd_score)


def cmd_train_demo_model(args: argparse.Namespace) -> int:
    for name in ("minutes", "vae_steps", "unet_steps", "scorer_steps", "pool_size", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            return fail(f"--{name.replace('_', '-')} must be positive, not {value}", EXIT_INVALID)
    if args.unet_cooldown_steps and (args.unet_steps is None or not 0 < args.unet_cooldown_steps <= args.unet_steps):
        return fail(f"--unet-cooldown-steps {args.unet_cooldown_steps} needs --unet-steps and must lie in "
                    f"1..--unet-steps", EXIT_INVALID)
    if args.vae_from and args.vae_steps:
        return fail("--vae-from uses that VAE as it is: leave out --vae-steps", EXIT_INVALID)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from workers.demo_model.train import TrainConfig, VaeSourceError, train_demo_model

    config = TrainConfig(seed=args.seed, minutes=args.minutes, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                         unet_cooldown_steps=args.unet_cooldown_steps, scorer_steps=args.scorer_steps,
                         pool_size=args.pool_size, threads=args.threads, vae_from=args.vae_from)
    with Progress(TextColumn("{task.description:<7}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[metrics]}")) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, step: int, steps: int | None, metrics: dict[str, float]) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=steps, metrics="")
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            bar.update(tasks[stage], completed=step, metrics=shown)

        try:
            record = train_demo_model(Path(args.out), config, progress)
        except VaeSourceError as exc:
            return fail("--vae-from" + str(exc).removeprefix("vae_from"), EXIT_INVALID)
    vae = f"from {args.vae_from}" if args.vae_from else f"{record['vae']['steps']} steps"
    print(f"saved {args.out}: vae {vae} ({record['vae']['psnr_db']} dB), "
          f"unet {record['unet']['steps']} steps, {record['vae']['seconds'] + record['unet']['seconds']:.0f} s")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from workers.demo_model.batch_score import default_scorer_dir, score_batch

    scorer = Path(args.scorer) if args.scorer else default_scorer_dir(shipped_model_dir())
    if not (scorer / "config.json").is_file():
        return fail(f"--scorer {scorer}: no scorer there (expected config.json and model.safetensors)", EXIT_INVALID)
    settings = settings_of(args)
    summary = batch_summary(check_batch(args.batch), settings)
    result = score_batch(open_storage(settings.storage_url), summary, scorer)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for prompt, entry in result["per_prompt"].items():
        shown = f"{entry['accuracy']:6.1f}%" if entry["scorable"] else "unscorable"
        print(f"{shown:>10}  {entry['correct']}/{entry['images']}  {prompt}")
    overall = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.1f}%"
    extra = f", {result['unscorable']} unscorable" if result["unscorable"] else ""
    print(f"overall: {overall} of {result['scored']} scorable image(s){extra}; wrote {result['key']}")
    return 0
