"""The `darkroom` command. Worker-side packages are imported only by worker-side subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from kombu.exceptions import OperationalError

from broker.settings import redact_url
from darkroom import submit
from darkroom.batches import BatchSummary, batch_summary
from darkroom.cli_batches import add_batch_commands
from darkroom.cli_common import (
    EXIT_CANCELLED,
    EXIT_FAILED_ITEMS,
    EXIT_INVALID,
    EXIT_UNAVAILABLE,
    check_batch,
    fail,
    settings_of,
)
from darkroom.cli_demo_model import add_demo_model_commands
from darkroom.cli_models import add_model_commands
from darkroom.cli_ops import add_ops_commands
from darkroom.cli_steer import add_steer_commands
from darkroom.convert import submit_convert
from darkroom.demo import run_demo
from darkroom.progress_view import print_summary, wait_with_progress
from storage import ObjectNotFound, StorageError, keys, open_storage
from tasks.errors import InvalidRequest, ServiceUnavailable
from tasks.families import COMMON_DEFAULTS, FAMILY_RULES, WUERSTCHEN
from tasks.names import (
    ANNOTATORS,
    BATCH_WEBHOOK_EVENTS,
    DEFAULT_DEVICE,
    DEFAULT_PRIORITY,
    PRIORITIES,
    SCHEDULER_NAMES,
    WEBHOOK_EVENTS,
)
from tasks.request import GenerationRequest
from tasks.tokens import LONG_PROMPT_POLICIES


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_INVALID
    return run_reporting_errors(args.func, args)


def run_reporting_errors(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """User errors and unreachable services are one line on stderr and an exit code, never a traceback."""
    try:
        return func(args)
    except InvalidRequest as exc:
        return fail(str(exc), EXIT_INVALID)
    except (ServiceUnavailable, StorageError, OperationalError, redis.ConnectionError, redis.TimeoutError) as exc:
        message = str(exc)
        for url in (getattr(args, "broker_url", None), getattr(args, "storage_url", None)):
            if url:
                message = message.replace(url, redact_url(url))
        return fail(message, EXIT_UNAVAILABLE)
    except TimeoutError as exc:
        return fail(str(exc), EXIT_UNAVAILABLE)
    except KeyboardInterrupt:
        print("darkroom: interrupted", file=sys.stderr)
        return 130


# The `darkroom submit` flags that are fields of the request, under the request's own names.
SUBMIT_FIELDS = ("model", "steps", "guidance", "width", "height", "seed", "negative_prompt", "images_per_prompt",
                 "scheduler", "device", "precision", "batch_id", "column", "queue", "priority", "skip_invalid",
                 "long_prompts",
                 "control_image", "annotator", "controlnet_scale", "init_image", "strength", "watermark",
                 "prior_steps", "prior_guidance", "webhook", "webhook_events")


def request_from_args(args: argparse.Namespace) -> GenerationRequest:
    """The one request object from `darkroom submit`'s flags; flags left out stay None (the defaults apply)."""
    prompts = args.prompts if args.prompts != "-" else sys.stdin.read().splitlines()
    given = {name: getattr(args, name) for name in SUBMIT_FIELDS if getattr(args, name) is not None}
    return GenerationRequest.build(prompts, **given)


def cmd_submit(args: argparse.Namespace) -> int:
    handle = submit(request_from_args(args), settings=settings_of(args))
    for problem in handle.invalid:
        print(f"darkroom: skipped {problem}", file=sys.stderr)
    if not args.wait:
        if args.json:
            print(json.dumps({"batch_id": handle.batch_id, "total": handle.total, "invalid": list(handle.invalid)}))
        else:
            print(f"batch {handle.batch_id}: {handle.total} image(s) queued")
        return 0
    summary = wait_with_progress(handle, quiet=args.json, timeout=args.timeout)
    print_summary(summary, as_json=args.json)
    return exit_code(summary)


def exit_code(summary: BatchSummary) -> int:
    """A finished batch's exit code: cancelled, else some items failed, else 0."""
    if summary.state == "cancelled":
        return EXIT_CANCELLED
    return EXIT_FAILED_ITEMS if summary.failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    summary = batch_summary(check_batch(args.batch), settings_of(args))
    if args.json:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        print_summary(summary, as_json=False)
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    summary = batch_summary(check_batch(args.batch), settings)
    if args.download:
        storage = open_storage(settings.storage_url)
        target = Path(args.download)
        target.mkdir(parents=True, exist_ok=True)
        written = 0
        for item in summary.items:
            if item.status == "done":
                # The file name is derived from the item's index, never taken from the manifest's uri.
                try:
                    key = keys.image_key(summary.batch_id, item.index)
                    keys.write_download(target, key, storage.get_bytes(key))
                    written += 1
                except (ValueError, ObjectNotFound) as exc:
                    print(f"darkroom: skipped item {item.index!r}: {exc}", file=sys.stderr)
        print(f"downloaded {written} image(s) to {target}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        for item in summary.items:
            print(f"{item.index}\t{item.status}\t{item.seed}\t{item.uri or item.error}\t{item.prompt}")
    return EXIT_FAILED_ITEMS if summary.failed else 0


def cmd_worker(args: argparse.Namespace) -> int:
    from workers.serve import InvalidCores, UnknownDevice, run_worker

    queues = [q for q in (args.queues or "").split(",") if q] or None
    try:
        run_worker(settings_of(args), device=args.device, queues=queues, preload=args.preload,
                   concurrency=args.concurrency, loglevel=args.loglevel, cores=args.cores)
    except (UnknownDevice, InvalidCores) as exc:
        return fail(str(exc), EXIT_INVALID)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    result = submit_convert(args.source, name=args.name, weight_format=args.weight_format,
                            settings=settings_of(args), make_default=not args.no_default, family=args.family)
    if not args.wait:
        print(f"conversion {result.id} queued")
        return 0
    outcome = result.get(timeout=args.timeout, propagate=False)
    if not isinstance(outcome, dict) or outcome.get("status") != "done":
        error = outcome.get("error") if isinstance(outcome, dict) else outcome
        return fail(f"conversion of {args.source} failed: {error}", EXIT_INVALID)
    if args.json:
        print(json.dumps(outcome, indent=2))
    else:
        print(f"{outcome['name']}: {outcome['precision']} {outcome['fingerprint']} at {outcome['uri']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.data_dir), steps=args.steps, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    WUERSTCHEN_DEFAULTS = FAMILY_RULES[WUERSTCHEN].defaults

    parser = argparse.ArgumentParser(prog="darkroom", description=__doc__)
    parser.add_argument("--broker-url", help="Redis URL (env DARKROOM_BROKER_URL)")
    parser.add_argument("--storage-url", help="local folder or s3://bucket/prefix (env DARKROOM_STORAGE_URL)")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole system on embedded defaults")
    p.add_argument("--data-dir", default="darkroom-data")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("submit", help="submit a prompt batch")
    p.add_argument("prompts", help=".txt, .jsonl, .csv, a datasets folder/file/name, or - for stdin")
    p.add_argument("--model", required=True, help="a converted model's name (see `darkroom models`)")
    p.add_argument("--steps", type=int, help=f"denoising steps (default {COMMON_DEFAULTS['steps']}; Wuerstchen: "
                   f"{WUERSTCHEN_DEFAULTS['steps']}, the decoder's)")
    p.add_argument("--guidance", type=float, help=f"classifier-free guidance (default {COMMON_DEFAULTS['guidance']}; "
                   f"Wuerstchen: {WUERSTCHEN_DEFAULTS['guidance']}, the decoder's)")
    p.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's own size)")
    p.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's own size)")
    p.add_argument("--seed", type=int, help="batch seed; item seeds derive from it and the item index")
    p.add_argument("--negative-prompt", help="what every image should not show (a negative_prompt column "
                   "overrides it per item)")
    p.add_argument("--images-per-prompt", type=int,
                   help=f"images of each prompt (default {COMMON_DEFAULTS['images_per_prompt']})")
    p.add_argument("--scheduler", help=f"one of {', '.join(SCHEDULER_NAMES)}")
    p.add_argument("--device", help=f"OpenVINO device whose queue takes the batch (default {DEFAULT_DEVICE})")
    p.add_argument("--precision", help="pin an artifact precision (fp16, fp32, int8)")
    p.add_argument("--batch-id", help="name the batch; resubmitting a name only enqueues unfinished items")
    p.add_argument("--column", help="the prompt column of a CSV or dataset")
    p.add_argument("--queue", help="send to this queue instead of generate.DEVICE")
    p.add_argument("--priority", choices=PRIORITIES, help=f"high, normal or low (default {DEFAULT_PRIORITY}): a "
                   "worker takes the next image from the highest priority that has one")
    p.add_argument("--skip-invalid", action="store_true", help="enqueue the valid lines, report the others")
    p.add_argument("--control-image", metavar="PATH", help="ControlNet models: the control image of every item "
                   "(a control_image column of a .jsonl/.csv overrides it per item)")
    p.add_argument("--annotator", help=f"ControlNet models: annotate the control image first, one of "
                   f"{', '.join(ANNOTATORS)}")
    p.add_argument("--controlnet-scale", type=float, help=f"ControlNet models: weight of the control (default "
                   f"{COMMON_DEFAULTS['controlnet_scale']})")
    p.add_argument("--init-image", metavar="PATH", help="SD 1.x image-to-image: the image every item starts from "
                   "(an init_image column of a .jsonl/.csv overrides it per item); it sets the output size")
    p.add_argument("--strength", type=float, help=f"image-to-image: how much to redraw, in (0, 1] (default "
                   f"{COMMON_DEFAULTS['strength']})")
    p.add_argument("--prior-steps", type=int, help=f"Wuerstchen models: the prior's steps (default "
                   f"{WUERSTCHEN_DEFAULTS['prior_steps']}; --steps is the decoder's)")
    p.add_argument("--prior-guidance", type=float, help=f"Wuerstchen models: the prior's guidance (default "
                   f"{WUERSTCHEN_DEFAULTS['prior_guidance']}; --guidance is the decoder's)")
    p.add_argument("--watermark", metavar="TEXT", help="embed TEXT as an invisible watermark in every image "
                   "(images of at least 256x256; recorded in the PNG metadata)")
    p.add_argument("--long-prompts", choices=LONG_PROMPT_POLICIES,
                   help="prompts longer than the model's tokens: refuse the batch (default), or render the "
                        "first tokens and record a warning in the item's result")
    p.add_argument("--webhook", metavar="URL", help="POST the batch's events to URL (http/https; signed when "
                   "DARKROOM_WEBHOOK_SECRET is set; default env DARKROOM_WEBHOOK_URL)")
    p.add_argument("--webhook-events", metavar="LIST", help=f"comma-separated, among {', '.join(WEBHOOK_EVENTS)} "
                   f"(default {','.join(BATCH_WEBHOOK_EVENTS)})")
    p.add_argument("--wait", action="store_true", help="show progress; exit 1 if any item failed")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.set_defaults(func=cmd_submit)

    for name, func, text in (("status", cmd_status, "a batch's progress"),
                             ("results", cmd_results, "a batch's items")):
        p = sub.add_parser(name, help=text)
        p.add_argument("batch")
        p.add_argument("--json", action="store_true")
        if name == "results":
            p.add_argument("--download", metavar="DIR", help="copy the batch's images into DIR")
        p.set_defaults(func=func)

    p = sub.add_parser("worker", help="run a worker pinned to one OpenVINO device")
    p.add_argument("--device", default=DEFAULT_DEVICE, help="the OpenVINO device this worker is pinned to")
    p.add_argument("--queues", help="comma-separated queues (default: generate.DEVICE)")
    p.add_argument("--preload", action="append", metavar="MODEL", help="compile MODEL before taking jobs")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--cores", metavar="LIST", help="pin the worker to these CPU cores, e.g. 0-7 or 0,2,4 "
                   "(OpenVINO then runs exactly that many threads); several workers can split one machine")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("convert", help="convert a diffusers model to OpenVINO IR in storage")
    p.add_argument("source", help="a local diffusers folder or a Hugging Face repo id")
    p.add_argument("--name", required=True)
    p.add_argument("--weight-format", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--family", help="model family (sd, sdxl, controlnet, wuerstchen; default: detected from "
                   "model_index.json); "
                   "a model of another family is refused")
    p.add_argument("--no-default", action="store_true", help="do not make it the model's default")
    p.add_argument("--no-wait", dest="wait", action="store_false")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_convert)

    add_model_commands(sub)
    add_batch_commands(sub)
    add_ops_commands(sub)
    add_steer_commands(sub)
    add_demo_model_commands(sub)
    return parser
