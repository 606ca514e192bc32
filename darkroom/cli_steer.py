"""`darkroom cancel | pause | resume BATCH`: steering a submitted batch."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from darkroom.cli_common import check_batch, settings_of
from darkroom.steering import SteerResult, cancel, pause, resume

_SAID = {
    "cancel": "cancelled ({items} item(s) that had not started recorded cancelled; running ones stop at their next "
              "step)",
    "pause": "paused: items that reach a worker are parked until `darkroom resume`; running ones finish",
    "resume": "resumed: {items} parked item(s) sent again",
}


def add_steer_commands(sub: Any) -> None:
    for name, func, text in (
            ("cancel", cancel, "cancel a batch: nothing more of it renders; its manifest completes"),
            ("pause", pause, "pause a batch: its items wait, other batches' items go ahead"),
            ("resume", resume, "resume a paused batch")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("batch", help="the batch id `darkroom submit` printed")
        p.add_argument("--json", action="store_true", help="print the outcome as JSON")
        p.set_defaults(func=_command(name, func))


def _command(name: str, operation: Callable[..., SteerResult]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        result = operation(check_batch(args.batch), settings=settings_of(args))
        if args.json:
            print(json.dumps(result.as_json()))
        elif result.note:
            print(f"batch {result.batch_id}: {result.note}")
        else:
            print(f"batch {result.batch_id}: " + _SAID[name].format(items=result.items))
        return 0

    return run
