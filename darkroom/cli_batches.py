"""`darkroom retry` and `darkroom dead-letters`: a finished batch's failed items sent again, and what was given up."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from darkroom.cli_common import EXIT_FAILED_ITEMS, settings_of
from darkroom.progress_view import print_summary, wait_with_progress
from darkroom.retry import dead_letters, retry


def cmd_retry(args: argparse.Namespace) -> int:
    # Neither flag: both kinds; one flag: only that kind.
    both = not (args.failed or args.dead)
    handle = retry(args.batch, failed=args.failed or both, dead=args.dead or both, settings=settings_of(args))
    if not args.wait:
        if args.json:
            print(json.dumps({"batch_id": handle.batch_id, "total": handle.total, "retried": list(handle.retried)}))
        elif handle.retried:
            items = ", ".join(str(i) for i in handle.retried)
            print(f"batch {handle.batch_id}: {len(handle.retried)} item(s) queued again ({items})")
        else:
            print(f"batch {handle.batch_id}: nothing to retry")
        return 0
    summary = wait_with_progress(handle, quiet=args.json, timeout=args.timeout)
    print_summary(summary, as_json=args.json)
    return EXIT_FAILED_ITEMS if summary.failed else 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    letters = dead_letters(args.batch, settings=settings_of(args))
    if args.json:
        print(json.dumps([letter.as_json() for letter in letters], indent=2))
        return 0
    if not letters:
        print("no dead letters" + (f" in batch {args.batch}" if args.batch else ""), file=sys.stderr)
    for letter in letters:
        print(f"{letter.batch_id}\t{letter.index}\t{letter.attempts} attempts\t{_when(letter.at)}\t{letter.error}"
              f"\t{letter.prompt}")
    return 0


def _when(at: Any) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S") if isinstance(at, int | float) else "-"


def add_batch_commands(sub: Any) -> None:
    p = sub.add_parser("retry", help="send a finished batch's failed and dead-lettered items again")
    p.add_argument("batch")
    p.add_argument("--failed", action="store_true", help="only failed items that were not dead-lettered")
    p.add_argument("--dead", action="store_true", help="only dead-lettered items (see `darkroom dead-letters`)")
    p.add_argument("--wait", action="store_true", help="show progress; exit 1 if any item still failed")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("dead-letters", help="items whose worker died on every attempt, of one batch or all")
    p.add_argument("batch", nargs="?", help="one batch (default: every batch)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dead_letters)
