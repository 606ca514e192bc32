"""Nightly calibration and retention schedules, held in Redis by celery-redbeat: no schedule file, a standby beat
takes over."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.schedules import crontab, schedule

from broker.app import make_app
from broker.gc import format_duration, parse_duration
from broker.settings import Settings
from tasks.errors import InvalidRequest
from tasks.names import CALIBRATE_QUEUE, CALIBRATE_TASK, GC_TASK, MAINTENANCE_QUEUE
from tasks.schemas import CalibrateJob

ENTRY_PREFIX = "calibrate-"
# Retention's one entry: never a calibration's, whose names all start with ENTRY_PREFIX.
GC_ENTRY = "gc"


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    model: str
    when: str
    next_run: str | None
    last_run: str | None
    job: dict[str, Any]


def parse_cron(text: str) -> crontab:
    """A five-field cron line ("0 2 * * *": minute hour day-of-month month day-of-week)."""
    fields = text.split()
    if len(fields) != 5:
        raise InvalidRequest(f"{text!r} needs five fields: minute hour day-of-month month day-of-week", field="cron")
    minute, hour, day_of_month, month, day_of_week = fields
    try:
        return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                       day_of_week=day_of_week)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"{text!r} is not a valid cron line ({exc})", field="cron") from None


def add_schedule(settings: Settings, job: CalibrateJob, *, cron: str | None = None,
                 every: float | None = None) -> ScheduleInfo:
    """Create or replace the calibration schedule of `job.name`."""
    from redbeat import RedBeatSchedulerEntry

    when = _when(cron, every)
    app = make_app(settings)
    scheduled = job.model_copy(update={"origin": "schedule"})
    entry = RedBeatSchedulerEntry(ENTRY_PREFIX + job.name, CALIBRATE_TASK, when,
                                  kwargs={"job": scheduled.model_dump()}, options={"queue": CALIBRATE_QUEUE},
                                  app=app)
    entry.save()
    return _info(entry, app)


def add_gc_schedule(settings: Settings, older_than: str, *, cron: str | None = None,
                    every: float | None = None) -> ScheduleInfo:
    """Create or replace the retention schedule: `darkroom.gc` on the maintenance queue.

    `older_than` is kept as written (`30d`), checked now so a typo fails here and not at 4 am.
    """
    from redbeat import RedBeatSchedulerEntry

    when = _when(cron, every)
    job = {"older_than": format_duration(parse_duration(older_than)), "dry_run": False}
    app = make_app(settings)
    entry = RedBeatSchedulerEntry(GC_ENTRY, GC_TASK, when, kwargs={"job": job},
                                  options={"queue": MAINTENANCE_QUEUE}, app=app)
    entry.save()
    return _info(entry, app)


def _when(cron: str | None, every: float | None) -> Any:
    if (cron is None) == (every is None):
        raise InvalidRequest("give exactly one of --cron or --every", field="cron")
    if every is not None and not every > 0:
        raise InvalidRequest(f"{every} is not a positive number of seconds", field="every")
    return parse_cron(cron) if cron is not None else schedule(run_every=every)


def list_schedules(settings: Settings) -> list[ScheduleInfo]:
    from redbeat import RedBeatSchedulerEntry
    from redbeat.schedulers import ensure_conf, get_redis

    app = make_app(settings)
    ensure_conf(app)
    keys = get_redis(app).zrange(app.redbeat_conf.schedule_key, 0, -1)
    entries = []
    for key in keys:
        key = key.decode() if isinstance(key, bytes) else key
        try:
            entries.append(_info(RedBeatSchedulerEntry.from_key(key, app=app), app))
        except KeyError:
            continue  # removed while we listed
    return sorted(entries, key=lambda e: e.name)


def remove_schedule(settings: Settings, model: str) -> None:
    _remove(settings, ENTRY_PREFIX + model, f"no schedule for model {model!r}")


def remove_gc_schedule(settings: Settings) -> None:
    _remove(settings, GC_ENTRY, "no gc schedule")


def _remove(settings: Settings, name: str, missing: str) -> None:
    from redbeat import RedBeatSchedulerEntry
    from redbeat.schedulers import ensure_conf

    app = make_app(settings)
    ensure_conf(app)
    try:
        entry = RedBeatSchedulerEntry.from_key(RedBeatSchedulerEntry.generate_key(app, name), app=app)
    except KeyError:
        raise InvalidRequest(missing, field="name") from None
    entry.delete()


def run_beat(settings: Settings, *, loglevel: str = "INFO") -> None:
    """celery beat with the Redis-held scheduler; several may run, one holds the lock, the others stand by."""
    app = make_app(settings)
    app.start(["beat", "-S", "redbeat.RedBeatScheduler", "--loglevel", loglevel])


def _info(entry: Any, app: Celery) -> ScheduleInfo:
    job = (entry.kwargs or {}).get("job", {})
    meta = entry.last_run_at.isoformat() if getattr(entry, "last_run_at", None) else None
    try:
        due = entry.due_at.isoformat() if entry.due_at else None
    except Exception:  # a never-run interval entry has no reference time yet
        due = None
    return ScheduleInfo(name=entry.name, model=job.get("name", entry.name.removeprefix(ENTRY_PREFIX)),
                        when=_describe(entry.schedule), next_run=due, last_run=meta, job=job)


def _describe(when: Any) -> str:
    if isinstance(when, crontab):
        return f"cron {when._orig_minute} {when._orig_hour} {when._orig_day_of_month} " \
               f"{when._orig_month_of_year} {when._orig_day_of_week}"
    return f"every {when.run_every.total_seconds():g} s"
