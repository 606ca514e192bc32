"""Retention from Python and the command line (`darkroom gc --older-than 30d [--dry-run] [--json]`).

The deciding and deleting is broker/gc.py's, shared with the `darkroom.gc` task celery beat runs on a worker;
this module reaches the services from settings and words the report.
"""

from __future__ import annotations

from datetime import timedelta

from broker.gc import GcCategory, GcReport, collect_garbage, format_duration, parse_duration
from broker.progress import BatchProgress
from broker.settings import Settings
from storage import open_storage

__all__ = ["GcCategory", "GcReport", "collect_garbage", "format_report", "gc", "parse_duration"]

_LABELS = {"batches": ("batches", "batch", "batches"), "int8_candidates": ("int8 candidates", "artifact", "artifacts"),
           "compiled_blobs": ("compiled blobs", "folder", "folders")}


def gc(older_than: str | timedelta, *, dry_run: bool = False, settings: Settings | None = None) -> GcReport:
    """Delete finished batches, unpromoted INT8 candidates and orphaned compiled blobs older than `older_than`
    (`"30d"`, `"12h"`, `"1d12h"` or a timedelta); with `dry_run`, only report what would go."""
    # The duration first: a malformed one reaches no service and deletes nothing.
    duration = parse_duration(older_than) if isinstance(older_than, str) else older_than
    settings = settings or Settings.from_env()
    progress = BatchProgress(settings.broker_url, ttl=settings.progress_ttl)
    progress.ping()  # without Redis, a running batch cannot be told from a finished one: stop here
    try:
        return collect_garbage(open_storage(settings.storage_url), progress, older_than=duration, dry_run=dry_run)
    finally:
        progress.close()


def format_report(report: GcReport) -> list[str]:
    """The report as lines for a terminal: per category and in total, objects and bytes."""
    verb = "would free (dry run: nothing deleted)" if report.dry_run else "freed"
    lines = [f"gc {verb}, older than {format_duration(report.older_than)} "
             f"(before {report.cutoff.isoformat(timespec='seconds')}):"]
    for name, category in report.categories.items():
        label, one, many = _LABELS[name]
        count = f"{len(category.units)} {one if len(category.units) == 1 else many}"
        lines.append(f"  {label:<16} {count:<14} {category.objects:>8} objects {_size(category.bytes):>11}")
    lines.append(f"  {'total':<16} {'':<14} {report.objects:>8} objects {_size(report.bytes):>11}")
    return lines


def _size(n: int) -> str:
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            break
        size /= 1024
    return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
