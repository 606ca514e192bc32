"""How the `darkroom` command shows a batch: a progress bar while it runs, a summary when it ends."""

from __future__ import annotations

import json
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def wait_with_progress(handle: Any, *, quiet: bool, timeout: float | None) -> Any:
    if quiet:
        return handle.wait(timeout=timeout)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(handle.batch_id, total=handle.total, failed=0)
        return handle.wait(timeout=timeout, on_progress=lambda c: bar.update(task, completed=c.finished,
                                                                             failed=c.failed + c.cancelled))


def print_summary(summary: Any, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.as_json(), indent=2))
        return
    cancelled = f", {summary.cancelled} cancelled" if summary.cancelled else ""
    print(f"batch {summary.batch_id}: {summary.state}, {summary.done} done, {summary.failed} failed{cancelled} "
          f"of {summary.total}")
    for event, hook in sorted(getattr(summary, "webhooks", {}).items()):
        error = f": {hook['last_error']}" if hook.get("last_error") and hook["status"] != "delivered" else ""
        print(f"  webhook {event}: {hook['status']} after {hook['attempts']} attempt(s) at {hook['at']}{error}")
    for item in summary.items:
        if item.status == "failed":
            print(f"  item {item.index} ({item.prompt!r}): {item.error}")
        for warning in item.warnings:
            print(f"  item {item.index}: warning: {warning}")
