"""`darkroom cancel | pause | resume | priority BATCH`: steering a submitted batch."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from darkroom.cli_common import check_batch, settings_of
from darkroom.steering import SteerResult, cancel, pause, reprioritize, resume
from tasks.names import PRIORITIES

_SAID = {
    "cancel": "cancelled ({items} item(s) that had not started recorded cancelled; running ones stop at their next "
              "step)",
    "pause": "paused: items that reach a worker are parked until `darkroom resume`; running ones finish",
    "resume": "resumed: {items} parked item(s) sent again",
}
Operation = Callable[[argparse.Namespace], SteerResult]


def add_steer_commands(sub: Any) -> None:
    operations: tuple[tuple[str, Operation, str], ...] = (
        ("cancel", lambda a: cancel(check_batch(a.batch), settings=settings_of(a)),
         "cancel a batch: nothing more of it renders; its manifest completes"),
        ("pause", lambda a: pause(check_batch(a.batch), settings=settings_of(a)),
         "pause a batch: its items wait, other batches' items go ahead"),
        ("resume", lambda a: resume(check_batch(a.batch), settings=settings_of(a)), "resume a paused batch"),
        ("priority", lambda a: reprioritize(check_batch(a.batch), a.level, settings=settings_of(a)),
         "move a batch's waiting items to another priority (running ones finish)"),
    )
    for name, operation, text in operations:
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("batch", help="the batch id `darkroom submit` printed")
        if name == "priority":
            p.add_argument("level", choices=PRIORITIES, help="high, normal or low")
        p.add_argument("--json", action="store_true", help="print the outcome as JSON")
        p.set_defaults(func=_command(name, operation))


def _command(name: str, operation: Operation) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        result = operation(args)
        if args.json:
            print(json.dumps(result.as_json()))
        elif result.note:
            print(f"batch {result.batch_id}: {result.note}")
        else:
            print(f"batch {result.batch_id}: " + _SAID[name].format(items=result.items))
        return 0

    return run
