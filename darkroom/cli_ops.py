"""`darkroom flower | metrics | gallery | gc`, and `--metrics-port` for `darkroom worker`: running a fleet."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.app import make_app
from broker.metrics import serve_exporter
from broker.progress import BatchProgress
from broker.settings import METRICS_ADDRESS_ENV, METRICS_PORT_ENV
from darkroom.batches import batch_summary
from darkroom.cli_common import EXIT_INVALID, fail, settings_of
from darkroom.gallery import default_gallery_dir, write_gallery
from darkroom.gc import format_report, gc, parse_duration
from storage import keys, open_storage
from tasks.errors import InvalidRequest

FLOWER_AUTH_ENV = "DARKROOM_FLOWER_AUTH"
FLOWER_PORT = 5555
EXPORTER_PORT = 9808


def check_flower_auth(value: str | None) -> list[str]:
    """The `user:password` pairs of DARKROOM_FLOWER_AUTH (comma-separated); InvalidRequest if there are none."""
    if not value or not value.strip():
        raise InvalidRequest(f"{FLOWER_AUTH_ENV} is not set: Flower needs basic auth, e.g. "
                             f"export {FLOWER_AUTH_ENV}=admin:$(openssl rand -hex 16)")
    pairs = [p.strip() for p in value.split(",")]
    for pair in pairs:
        user, _, password = pair.partition(":")
        if not user or not password:
            # Never echo the value: it is a password, or most of one.
            raise InvalidRequest(f"{FLOWER_AUTH_ENV} must be user:password (several separated by commas, "
                                 "no comma in a password); an entry has an empty user or password")
    return pairs


def cmd_flower(args: argparse.Namespace) -> int:
    pairs = check_flower_auth(os.environ.get(FLOWER_AUTH_ENV))
    try:
        import flower  # noqa: F401  (its celery subcommand is found through an entry point)
    except ImportError:
        return fail("Flower is not installed: install the ops extra (`pip install '.[ops]'` in darkroom's "
                    "checkout)", EXIT_INVALID)
    settings = settings_of(args)
    BatchProgress(settings.broker_url).ping()
    if args.address not in ("127.0.0.1", "localhost", "::1"):
        print(f"darkroom flower: warning: Flower's /metrics and /healthcheck answer without the password on "
              f"{args.address}:{args.port}", file=sys.stderr, flush=True)
    # In-process, so the password is in no process's command line.
    try:
        make_app(settings).start(["flower", f"--address={args.address}", f"--port={args.port}",
                                  f"--basic_auth={','.join(pairs)}"])
    except OSError as exc:  # the port is taken, or the address is not this machine's
        return fail(f"cannot serve Flower on {args.address}:{args.port}: {exc.strerror or exc}", EXIT_INVALID)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return fail("the exporter needs prometheus-client: install the ops extra (`pip install '.[ops]'` in "
                    "darkroom's checkout)", EXIT_INVALID)

    queues = [q for q in (args.queues or "").split(",") if q]
    serve_exporter(settings_of(args), port=args.port, address=args.address, queues=queues)
    return 0


def cmd_gallery(args: argparse.Namespace) -> int:
    try:
        batch_id = keys.check_name("batch", args.batch)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="batch") from None
    settings = settings_of(args)
    summary = batch_summary(batch_id, settings)
    out = Path(args.out) if args.out else default_gallery_dir(batch_id)
    index = write_gallery(open_storage(settings.storage_url), batch_id, list(summary.items), out,
                          state=summary.state)
    print(index)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    older_than = parse_duration(args.older_than)  # before any service is reached: a typo deletes nothing
    report = gc(older_than, dry_run=args.dry_run, settings=settings_of(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(format_report(report)))
    return 0


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _add_worker_metrics(sub: Any) -> None:
    """`darkroom worker --metrics-port P`: handed to the worker through its environment (DARKROOM_METRICS_PORT)."""
    worker = sub.choices.get("worker")
    if worker is None:
        return
    worker.add_argument("--metrics-port", type=_port,
                        help="serve Prometheus metrics on this port (default: off; env DARKROOM_METRICS_PORT)")
    worker.add_argument("--metrics-address", help="address for --metrics-port (default 0.0.0.0)")
    run: Callable[[argparse.Namespace], int] = worker.get_default("func")

    def run_with_metrics(args: argparse.Namespace) -> int:
        if args.metrics_port is not None:
            os.environ[METRICS_PORT_ENV] = str(args.metrics_port)
        if args.metrics_address:
            os.environ[METRICS_ADDRESS_ENV] = args.metrics_address
        return run(args)

    worker.set_defaults(func=run_with_metrics)


def add_ops_commands(sub: Any) -> None:
    p = sub.add_parser("flower", help=f"Flower, the Celery monitor, with basic auth from {FLOWER_AUTH_ENV}")
    p.add_argument("--port", type=_port, default=FLOWER_PORT)
    p.add_argument("--address", default="127.0.0.1",
                   help="listen address (default 127.0.0.1: Flower's /metrics and /healthcheck need no password)")
    p.set_defaults(func=cmd_flower)

    p = sub.add_parser("metrics", help="Prometheus exporter: queue depth per job kind and device, batch progress")
    p.add_argument("--port", type=_port, default=EXPORTER_PORT)
    p.add_argument("--address", default="0.0.0.0")
    p.add_argument("--queues", default="generate.CPU",
                   help="comma-separated queues to report even while empty (convert, calibrate and every "
                        "generate.* queue found in Redis are reported anyway)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("gallery", help="a batch's contact sheet and an HTML page of its images and metadata")
    p.add_argument("batch")
    p.add_argument("--out", metavar="DIR", help="default ./darkroom-data/gallery/BATCH/")
    p.set_defaults(func=cmd_gallery)

    p = sub.add_parser("gc", help="retention: delete finished batches, unpromoted INT8 candidates and orphaned "
                       "compiled blobs older than --older-than")
    p.add_argument("--older-than", required=True, metavar="DURATION",
                   help="e.g. 30d, 12h, 90m, 45s or 1d12h; batches by when they finished, artifacts by when made")
    p.add_argument("--dry-run", action="store_true", help="delete nothing; report what would be freed")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_gc)

    _add_worker_metrics(sub)
