"""What every `darkroom` subcommand shares: exit codes, the one-line error, settings from flags and env."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from broker.settings import Settings
from storage import keys
from tasks.errors import InvalidRequest

EXIT_FAILED_ITEMS = 1
EXIT_INVALID = 2
EXIT_UNAVAILABLE = 3
# `darkroom submit --wait` (and `retry --wait`) on a batch that ended cancelled.
EXIT_CANCELLED = 4


def fail(message: str, code: int) -> int:
    print(f"darkroom: error: {message}", file=sys.stderr)
    return code


def settings_of(args: argparse.Namespace) -> Any:
    return Settings.from_env(broker_url=args.broker_url, storage_url=args.storage_url)


def check_batch(batch: str) -> str:
    try:
        return keys.check_name("batch", batch)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="batch") from None
