"""Celery task handlers: thin adapters from a message to the job code, which knows nothing of Celery."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any, NoReturn

from billiard.exceptions import WorkerLostError
from celery import Celery, Task
from celery.exceptions import Ignore
from celery.signals import task_failure, worker_process_init

from broker.settings import Settings
from tasks.errors import InvalidRequest, TransientError
from tasks.names import CALIBRATE_TASK, CONVERT_TASK, GENERATE_TASK
from workers.runtime import metrics

log = logging.getLogger(__name__)

_SUMMARY_FIELDS = {"batch_id", "index", "status", "uri", "error", "seed"}


def backoff(retries: int) -> float:
    """Seconds before retry number `retries + 1`: exponential, capped, with jitter against herds."""
    return min(2.0**retries, 60.0) * (0.5 + random.random() / 2)


def register_tasks(app: Celery, settings: Settings, device: str, *, preload: list[str] | None = None) -> None:
    """Register darkroom's tasks on `app` for a worker pinned to `device`."""
    holder: dict[str, Any] = {}

    def runtime() -> Any:
        # Made in the pool process on first use: nothing of OpenVINO exists before the fork.
        if "runtime" not in holder:
            from workers.runtime.context import WorkerRuntime

            holder["runtime"] = WorkerRuntime(settings, device)
        return holder["runtime"]

    # A pool process that dies mid-job (SIGKILL, OOM, a poison input) is an attempt too: retried after 1 s,
    # and after max_retries + 1 attempts dead-lettered (below) instead of looping.
    @app.task(name=GENERATE_TASK, bind=True, max_retries=settings.max_retries, retry_on_worker_lost=True,
              default_retry_delay=1)
    def generate(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        from workers.generate.job import record_failure, run_generate

        attempt = self.request.retries + 1
        rt = runtime()
        lock = _lock_or_defer(self, rt, job, settings)
        try:
            outcome = run_generate(job, rt, attempt=attempt)
        except InvalidRequest as exc:
            metrics.observe_failure("generate", "invalid")
            outcome = record_failure(job, rt, f"invalid request: {exc}", attempt=attempt)
        except TransientError as exc:
            if self.request.retries >= settings.max_retries:
                metrics.observe_failure("generate", "transient")
                outcome = record_failure(job, rt, f"gave up after {attempt} attempts: {exc}", attempt=attempt)
            else:
                metrics.observe_retry("generate")
                log.warning("item %s: %s; retrying", self.request.id, exc)
                raise self.retry(exc=exc, countdown=backoff(self.request.retries)) from None
        except Exception as exc:  # a bug or a runtime failure: report the item, keep the batch going
            log.exception("item %s failed", self.request.id)
            metrics.observe_failure("generate", "error")
            outcome = record_failure(job, rt, f"{type(exc).__name__}: {exc}", attempt=attempt)
        finally:
            if lock is not None:
                lock.release()
        metrics.sync_pool(rt)
        return outcome.result.model_dump(include=_SUMMARY_FIELDS)

    @app.task(name=CONVERT_TASK, bind=True, max_retries=settings.max_retries)
    def convert(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        from workers.convert.job import run_convert

        return _model_job(self, settings, lambda: {"status": "done", **run_convert(job, runtime())})

    @app.task(name=CALIBRATE_TASK, bind=True, max_retries=settings.max_retries)
    def calibrate(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        from workers.calibrate.job import CalibrationBusy, run_calibrate

        try:
            return _model_job(self, settings, lambda: run_calibrate(job, runtime()), passthrough=CalibrationBusy)
        except CalibrationBusy as exc:
            _defer(self, settings, "calibrate", str(exc))

    @task_failure.connect(sender=generate, weak=False)
    def _dead_letter(sender: Task, exception: BaseException | None = None, kwargs: dict[str, Any] | None = None,
                     **_: Any) -> None:
        # Celery sends this in the worker's main process once a job's pool process died on every attempt.
        if isinstance(exception, WorkerLostError):
            from workers.generate.job import dead_letter
            from workers.runtime.context import WorkerRuntime

            rt = holder.setdefault("parent", WorkerRuntime(settings, device))  # never handed to the pool
            dead_letter((kwargs or {}).get("job"), rt, f"{type(exception).__name__}: {exception}",
                        attempts=sender.request.retries + 1)

    if preload:
        @worker_process_init.connect(weak=False)
        def _preload(**_: Any) -> None:
            from tasks.models import resolve_model

            rt = runtime()
            for name in preload:
                ref = resolve_model(rt.storage, name)
                rt.pool.get(ref.name, ref.precision, ref.fingerprint, width=ref.width, height=ref.height, cfg=True)
                log.info("preloaded %s (%s %s)", name, ref.precision, ref.fingerprint)
            metrics.sync_pool(rt)


def _lock_or_defer(task: Task, rt: Any, job: Any, settings: Settings) -> Any:
    """The item's lock, or None for a message without an item identity; if another copy of the item is running
    (a redelivery after the visibility timeout), send this one again for later and end it (Ignore)."""
    from workers.runtime.delivery import ItemLock

    if not isinstance(job, dict) or not isinstance(job.get("batch_id"), str) or not isinstance(job.get("index"), int):
        return None
    lock = ItemLock(rt.progress.client, job["batch_id"], job["index"])
    if lock.acquire():
        return lock
    _defer(task, settings, "generate", f"item is running elsewhere ({lock.holder()})")


def _defer(task: Task, settings: Settings, kind: str, why: str) -> NoReturn:
    """Send this message again for later, under the same task id, and end this delivery (Ignore).

    For a second delivery while the first copy runs: acknowledging it as done would lose the job if the first
    copy then died. The attempt count stays: waiting for another copy is not a failed attempt.
    """
    from workers.runtime.delivery import defer_seconds

    countdown = defer_seconds(settings.visibility_timeout)
    log.info("%s %s: %s; looking again in %.0f s", kind, task.request.id, why, countdown)
    metrics.observe_retry(kind)
    task.signature_from_request(task.request, countdown=countdown, retries=task.request.retries).apply_async()
    raise Ignore()


def _model_job(task: Task, settings: Settings, run: Callable[[], dict[str, Any]],
               passthrough: type[Exception] | None = None) -> dict[str, Any]:
    """Conversion and calibration: a small JSON result either way; only transient trouble is retried."""
    kind = task.name.rsplit(".", 1)[-1]
    try:
        result = run()
        if result.get("status") == "failed":  # a job that reports its own failure (e.g. not enough memory)
            metrics.observe_failure(kind, "invalid")
        return result
    except InvalidRequest as exc:
        metrics.observe_failure(kind, "invalid")
        return {"status": "failed", "error": str(exc)}
    except TransientError as exc:
        if task.request.retries >= settings.max_retries:
            metrics.observe_failure(kind, "transient")
            return {"status": "failed", "error": f"gave up after {task.request.retries + 1} attempts: {exc}"}
        metrics.observe_retry(kind)
        raise task.retry(exc=exc, countdown=backoff(task.request.retries)) from None
    except Exception as exc:
        if passthrough is not None and isinstance(exc, passthrough):
            raise
        log.exception("%s failed", task.name)
        metrics.observe_failure(kind, "error")
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
