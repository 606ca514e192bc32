"""`darkroom models | calibrate | promote | rollback | schedule | beat`: a model's artifacts and their lifecycle."""

from __future__ import annotations

import argparse
import json
from typing import Any

from broker.progress import BatchProgress
from broker.schedule import (
    add_gc_schedule,
    add_schedule,
    list_schedules,
    remove_gc_schedule,
    remove_schedule,
    run_beat,
)
from darkroom.calibration import calibrate_job, promote, roll_back, submit_calibrate
from darkroom.cli_common import EXIT_INVALID, fail, settings_of
from storage import ObjectNotFound, keys, open_storage
from tasks.models import default_of, float_base, list_artifacts
from tasks.names import CALIBRATION_MODES


def cmd_models(args: argparse.Namespace) -> int:
    storage = open_storage(settings_of(args).storage_url)
    artifacts = list_artifacts(storage, args.name)
    for m in artifacts:
        if m.get("report"):
            try:
                m["report"] = storage.get_json(keys.model_report_key(m["name"], m["precision"], m["fingerprint"]))
            except ObjectNotFound:
                m["report"] = None
    if args.json:
        print(json.dumps(artifacts, indent=2))
        return 0
    if not artifacts:
        print("no models yet: convert one with `darkroom convert SOURCE --name NAME`")
    for m in artifacts:
        default = default_of(storage, m["name"]) or {}
        is_default = (default.get("precision"), default.get("fingerprint")) == (m["precision"], m["fingerprint"])
        mark = "*" if is_default else " "
        d = m.get("defaults", {})
        print(f"{mark} {m['name']:<20} {m['precision']:<5} {m['fingerprint']}  {m.get('family', 'sd'):<4} "
              f"{d.get('width')}x{d.get('height')}  {m.get('bytes', 0) / 2**20:8.1f} MiB  {m.get('created', '')[:19]}")
        if args.name and isinstance(m.get("report"), dict):
            _print_report(m["report"])
    if args.name and artifacts:
        default = default_of(storage, args.name) or {}
        print(f"default: {default.get('precision')} {default.get('fingerprint')} ({default.get('reason', '')})")
    return 0


def _print_report(report: dict[str, Any]) -> None:
    m, decision = report["measurements"], report["decision"]
    steps = ", ".join(f"{k} {v:.2f} ms" for k, v in m["unet_step_ms"].items())
    images = ", ".join(f"{k} {v:.3f} s" for k, v in m["image_s"].items())
    print(f"      {report['mode']} from {report['base']['precision']} {report['base']['fingerprint']}, "
          f"dataset {report['dataset']['source']} ({report['dataset']['prompts']} prompts, "
          f"{report['dataset']['fingerprint']})")
    print(f"      size {m['fp_bytes'] / 2**20:.1f} -> {m['int8_bytes'] / 2**20:.1f} MiB (x{m['size_ratio']:.2f}); "
          f"UNet {m['unet_fp_bytes'] / 2**20:.1f} -> {m['unet_int8_bytes'] / 2**20:.1f} MiB")
    print(f"      UNet step: {steps}; image: {images}; speed-up x{m['image_speedup']:.2f} "
          f"(UNet x{m['unet_speedup']:.2f})")
    print(f"      drift vs float: PSNR {m['psnr_db']:.1f} dB (min {m['min_psnr_db']:.1f}), "
          f"max pixel difference {m['max_pixel_diff']}")
    if report.get("adherence"):
        a = report["adherence"]
        print(f"      prompt adherence: FP32 {a['fp32']:.1f}%, INT8 {a['int8']:.1f}% (drop {a['drop']:.1f}, "
              f"at most {a['max_drop']:.1f} points); contact sheets {', '.join(a['contact_sheets'].values())}")
    print(f"      {'passed' if decision['passed'] else 'rejected'}: {decision['reason']}")


def _job(args: argparse.Namespace) -> Any:
    return calibrate_job(args.name, dataset=args.dataset, subset_size=args.subset_size, mode=args.mode,
                         steps=args.steps, min_speedup=args.min_speedup, min_psnr_db=args.min_psnr,
                         max_adherence_drop=args.max_adherence_drop,
                         promote=False if args.no_promote else None, force=True if args.force else None)


def cmd_calibrate(args: argparse.Namespace) -> int:
    result = submit_calibrate(_job(args), settings=settings_of(args))
    if not args.wait:
        print(f"calibration {result.id} queued")
        return 0
    outcome = result.get(timeout=args.timeout, propagate=False)
    if args.json:
        print(json.dumps(outcome, indent=2))
    if not isinstance(outcome, dict) or outcome.get("status") == "failed":
        error = outcome.get("error") if isinstance(outcome, dict) else outcome
        return fail(f"calibration of {args.name} failed: {error}", EXIT_INVALID)
    if not args.json:
        if outcome["status"] == "skipped":
            print(f"{args.name}: skipped: {outcome['reason']}")
        else:
            verdict = "promoted" if outcome["promoted"] else ("passed" if outcome["passed"] else "rejected")
            print(f"{args.name}: int8 {outcome['fingerprint']} {verdict}: {outcome['reason']}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    record = promote(args.name, args.fingerprint, settings=settings_of(args))
    print(f"{args.name}: default is now {record['precision']} {record['fingerprint']}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    record = roll_back(args.name, settings=settings_of(args))
    print(f"{args.name}: default is back to {record['precision']} {record['fingerprint']}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if args.action == "add":
        float_base(open_storage(settings.storage_url), args.name)  # an unknown model fails now, not at 2 am
        info = add_schedule(settings, _job(args), cron=args.cron, every=args.every)
        print(f"{info.model}: calibration {info.when}, next at {info.next_run}")
    elif args.action == "add-gc":
        info = add_gc_schedule(settings, args.older_than, cron=args.cron, every=args.every)
        print(f"gc of what is older than {info.job['older_than']}: {info.when}, next at {info.next_run} "
              f"(on the maintenance queue)")
    elif args.action == "remove-gc":
        remove_gc_schedule(settings)
        print("gc: schedule removed")
    elif args.action == "list":
        infos = list_schedules(settings)
        if args.json:
            print(json.dumps([i.__dict__ for i in infos], indent=2))
        for i in infos if not args.json else []:
            what = f"older than {i.job['older_than']}" if "older_than" in i.job else f"mode {i.job.get('mode')}"
            print(f"{i.model:<20} {i.when:<24} next {i.next_run}  last {i.last_run}  {what}")
    else:
        remove_schedule(settings, args.name)
        print(f"{args.name}: schedule removed")
    return 0


def cmd_beat(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    BatchProgress(settings.broker_url).ping()
    run_beat(settings, loglevel=args.loglevel)
    return 0


def _calibration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", help="a local JSON/JSONL/CSV/text file or folder, or a cached dataset name")
    p.add_argument("--subset-size", type=int)
    p.add_argument("--mode", choices=CALIBRATION_MODES)
    p.add_argument("--steps", type=int, help="denoising steps of the calibration and validation runs")
    p.add_argument("--min-speedup", type=float, help="gate: end-to-end speed-up over float (default 1.2)")
    p.add_argument("--min-psnr", type=float, help="gate: PSNR in dB of INT8 vs float images (default 25)")
    p.add_argument("--max-adherence-drop", type=float,
                   help="gate, models with a scorer: INT8 adherence at most this many points below FP32 (default 2)")
    p.add_argument("--no-promote", action="store_true", help="never make it the default, even if it passes")
    p.add_argument("--force", action="store_true", help="calibrate even if nothing changed")


def add_model_commands(sub: Any) -> None:
    p = sub.add_parser("models", help="list converted and calibrated models")
    p.add_argument("name", nargs="?", help="one model, with its calibration reports")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("calibrate", help="calibrate a model to INT8 on the calibrate queue")
    p.add_argument("name")
    _calibration_options(p)
    p.add_argument("--no-wait", dest="wait", action="store_false")
    p.add_argument("--timeout", type=float, default=6 * 3600)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("promote", help="make an artifact the model's default")
    p.add_argument("name")
    p.add_argument("fingerprint")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("rollback", help="go back to the model's previous default")
    p.add_argument("name")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("schedule", help="nightly calibration and retention schedules (celery-redbeat)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = actions.add_parser("add", help="calibrate NAME on a schedule")
    a.add_argument("name")
    a.add_argument("--cron", help='five cron fields, e.g. "0 2 * * *"')
    a.add_argument("--every", type=float, help="seconds between runs (instead of --cron)")
    _calibration_options(a)
    a.set_defaults(func=cmd_schedule)
    a = actions.add_parser("add-gc", help="run retention (darkroom gc) on a schedule, on the maintenance queue")
    a.add_argument("--cron", help='five cron fields, e.g. "0 4 * * *"')
    a.add_argument("--every", type=float, help="seconds between runs (instead of --cron)")
    a.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 30d, 12h or 1d12h")
    a.set_defaults(func=cmd_schedule)
    a = actions.add_parser("remove-gc", help="stop the scheduled retention")
    a.set_defaults(func=cmd_schedule)
    a = actions.add_parser("list")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_schedule)
    a = actions.add_parser("remove")
    a.add_argument("name")
    a.set_defaults(func=cmd_schedule)

    p = sub.add_parser("beat", help="run celery beat with the Redis-held schedule")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_beat)
