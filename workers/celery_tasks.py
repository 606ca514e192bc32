"""Celery tasks: thin adapters from a message to the job code (which knows nothing of Celery), and one failure
policy for all of them in their base class, `DarkroomTask`.

The tasks are shared tasks, so every app built from settings (`broker.app.make_app`) gets them; nothing happens
at import. A worker binds them to its settings and device with `configure_tasks` before its pool forks.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, ClassVar, NoReturn

from billiard.exceptions import WorkerLostError
from celery import Celery, Task, shared_task
from celery.exceptions import Ignore
from celery.signals import task_failure, worker_process_init

from broker.app import task_sender
from broker.settings import Settings
from tasks.errors import InvalidRequest, TransientError
from tasks.names import CALIBRATE_TASK, CONVERT_TASK, GC_TASK, GENERATE_TASK, WEBHOOK_TASK
from workers.runtime import metrics
from workers.runtime.context import WorkerRuntime
from workers.runtime.delivery import ItemLock, defer_seconds

log = logging.getLogger(__name__)

_SUMMARY_FIELDS = {"batch_id", "index", "status", "uri", "error", "seed"}


def backoff(retries: int) -> float:
    """Seconds before retry number `retries + 1`: exponential, capped, with jitter against herds."""
    return min(2.0**retries, 60.0) * (0.5 + random.random() / 2)


def _summary(outcome: Any) -> dict[str, Any]:
    """A generation's result: the item's identity and outcome; the full record is in storage and Redis."""
    summary = outcome.result.model_dump(include=_SUMMARY_FIELDS)
    return {**summary, "status": "parked"} if outcome.parked else summary


def _failed(error: str) -> dict[str, Any]:
    """A conversion's or calibration's failure: the small JSON result its caller reads."""
    return {"status": "failed", "error": error}


class DarkroomTask(Task):
    """Base of darkroom's tasks: the worker runtime they share, and the one failure policy of every job kind."""

    # Class-wide, not per task: a worker process serves one app pinned to one device, and its three tasks share
    # one runtime, so one warm model pool. Set by `configure_tasks` in the worker's main process, before the fork.
    _settings: ClassVar[Settings | None] = None
    _device: ClassVar[str] = ""
    _preload: ClassVar[tuple[str, ...]] = ()
    # (pid, runtime): the pid makes a pool process forked after its parent made a runtime (for a dead letter)
    # build its own instead of using the parent's connections.
    _runtime: ClassVar[tuple[int, WorkerRuntime] | None] = None

    @classmethod
    def configure(cls, settings: Settings, device: str, preload: list[str] | None = None) -> None:
        DarkroomTask._settings, DarkroomTask._device = settings, device
        DarkroomTask._preload = tuple(preload or ())
        DarkroomTask._runtime = None
        # Celery reads it too: `retry()` here, and `retry_on_worker_lost` in the worker's main process.
        DarkroomTask.max_retries = settings.max_retries

    @classmethod
    def configured(cls) -> Settings:
        """The worker's settings; a clear error in a process that never called configure_tasks."""
        if DarkroomTask._settings is None:
            raise RuntimeError("darkroom's tasks are not configured: call configure_tasks(app, settings, device)")
        return DarkroomTask._settings

    @classmethod
    def process_runtime(cls) -> WorkerRuntime:
        """This process's runtime, made on first use: in a pool process that is after the fork, so nothing of
        OpenVINO or of a connection is ever inherited."""
        held = DarkroomTask._runtime
        if held is None or held[0] != os.getpid():
            settings = cls.configured()
            runtime = WorkerRuntime(settings, DarkroomTask._device, send_task=task_sender(settings))
            held = DarkroomTask._runtime = (os.getpid(), runtime)
        return held[1]

    @property
    def settings(self) -> Settings:
        return self.configured()

    @property
    def runtime(self) -> WorkerRuntime:
        return self.process_runtime()

    @property
    def kind(self) -> str:
        """The job kind, as metrics and logs name it: generate, convert, calibrate."""
        return self.name.rsplit(".", 1)[-1]

    @property
    def attempt(self) -> int:
        return self.request.retries + 1

    def guarded(self, run: Callable[[], dict[str, Any]], failed: Callable[[str], dict[str, Any]] = _failed, *,
                invalid_prefix: str = "", defer_on: tuple[type[Exception], ...] = ()) -> dict[str, Any]:
        """Run a job under the one failure policy; a small JSON result either way, `failed(error)` on failure.

        InvalidRequest: failed at once, never retried. TransientError: retried with backoff, and given up (failed)
        after max_retries retries. `defer_on`: another copy of the job holds it, so this delivery is sent again for
        later (Ignore). Anything else is a bug or a runtime failure: logged and failed, so a batch keeps going.
        """
        retries = self.request.retries
        try:
            result = run()
        except InvalidRequest as exc:
            metrics.observe_failure(self.kind, "invalid")
            return failed(f"{invalid_prefix}{exc}")
        except TransientError as exc:
            if retries >= self.max_retries:
                metrics.observe_failure(self.kind, "transient")
                return failed(f"gave up after {retries + 1} attempts: {exc}")
            metrics.observe_retry(self.kind)
            countdown = backoff(retries)
            log.warning("%s %s: %s; retrying in %.0f s", self.kind, self.request.id, exc, countdown)
            raise self.retry(exc=exc, countdown=countdown) from None
        except defer_on as exc:
            self.defer(str(exc))
        except Exception as exc:
            log.exception("%s %s failed", self.kind, self.request.id)
            metrics.observe_failure(self.kind, "error")
            return failed(f"{type(exc).__name__}: {exc}")
        if result.get("status") == "failed":  # a job that reports its own failure (e.g. not enough memory)
            metrics.observe_failure(self.kind, "invalid")
        return result

    def lock_item(self, job: Any) -> AbstractContextManager[object]:
        """The item's lock, held while it runs (none for a message without an item identity). If another copy of
        the item is running (a redelivery after the visibility timeout), this one is deferred (Ignore)."""
        batch_id, index = (job.get("batch_id"), job.get("index")) if isinstance(job, dict) else (None, None)
        if not isinstance(batch_id, str) or not isinstance(index, int):
            return nullcontext()
        lock = ItemLock(self.runtime.progress.client, batch_id, index)
        if lock.acquire():
            return lock
        self.defer(f"item is running elsewhere ({lock.holder()})")

    def defer(self, why: str) -> NoReturn:
        """Send this message again for later, under the same task id, and end this delivery (Ignore).

        For a second delivery while the first copy runs: acknowledging it as done would lose the job if the first
        copy then died. The attempt count stays: waiting for another copy is not a failed attempt.
        """
        countdown = defer_seconds(self.settings.visibility_timeout)
        log.info("%s %s: %s; looking again in %.0f s", self.kind, self.request.id, why, countdown)
        metrics.observe_retry(self.kind)
        self.signature_from_request(self.request, countdown=countdown, retries=self.request.retries).apply_async()
        raise Ignore()

    def dead_letter(self, job: Any, exc: BaseException) -> None:
        """An item whose pool process died on every attempt: kept as a dead letter, and failed in its batch.

        Runs in the worker's main process, which makes its own runtime for it (never handed to the pool).
        """
        from workers.generate.job import dead_letter as record_dead_letter

        record_dead_letter(job, self.runtime, f"{type(exc).__name__}: {exc}", attempts=self.attempt)


# A pool process that dies mid-job (SIGKILL, OOM, a poison input) is an attempt too: retried after 1 s, and after
# max_retries + 1 attempts dead-lettered (configure_tasks) instead of looping.
@shared_task(base=DarkroomTask, bind=True, name=GENERATE_TASK, retry_on_worker_lost=True, default_retry_delay=1)
def generate(self: DarkroomTask, job: dict[str, Any]) -> dict[str, Any]:
    """One item of a batch: rendered and written, or failed in its batch (which still finishes and says why)."""
    from workers.generate.job import record_failure, run_generate

    rt, attempt = self.runtime, self.attempt
    with self.lock_item(job):
        result = self.guarded(lambda: _summary(run_generate(job, rt, attempt=attempt)),
                              lambda error: _summary(record_failure(job, rt, error, attempt=attempt)),
                              invalid_prefix="invalid request: ")
    metrics.sync_pool(rt)
    return result


@shared_task(base=DarkroomTask, bind=True, name=CONVERT_TASK)
def convert(self: DarkroomTask, job: dict[str, Any]) -> dict[str, Any]:
    from workers.convert.job import run_convert

    return self.guarded(lambda: {"status": "done", **run_convert(job, self.runtime)})


@shared_task(base=DarkroomTask, bind=True, name=CALIBRATE_TASK)
def calibrate(self: DarkroomTask, job: dict[str, Any]) -> dict[str, Any]:
    from workers.calibrate.job import CalibrationBusy, run_calibrate

    # A calibration of the same model already running is waited for, not skipped: if it dies, this one must run.
    return self.guarded(lambda: run_calibrate(job, self.runtime), defer_on=(CalibrationBusy,))


@shared_task(base=DarkroomTask, bind=True, name=GC_TASK)
def gc(self: DarkroomTask, job: dict[str, Any]) -> dict[str, Any]:
    """Retention, from celery beat: deletes what `darkroom gc` would (broker/gc.py), and says what it freed."""
    from broker.gc import run_gc_job
    from storage import StorageUnavailable

    def run() -> dict[str, Any]:
        try:
            return run_gc_job(job, self.runtime.storage, self.runtime.progress)
        except StorageUnavailable as exc:  # deletions are idempotent: a retry picks up where this one stopped
            raise TransientError(f"storage unavailable: {exc}") from exc

    return self.guarded(run)


# Its own retry schedule, not the failure policy of jobs: retried with exponential backoff for as long as
# DARKROOM_WEBHOOK_RETRY_FOR allows (broker/webhooks.py deliver), however many attempts that is; its outcome is
# recorded in Redis, never in the batch, and a webhook that fails never fails the batch.
@shared_task(base=DarkroomTask, bind=True, name=WEBHOOK_TASK, ignore_result=True)
def webhook(self: DarkroomTask, delivery: dict[str, Any]) -> dict[str, Any]:
    """POST one event of a batch to its webhook URL, signed; sent again later on a timeout, 5xx, 408 or 429."""
    from broker.webhooks import deliver

    progress = self.runtime.progress
    wait = deliver(delivery, progress.client, attempt=self.attempt, ttl=self.settings.progress_ttl,
                   max_wait=self.settings.visibility_timeout / 2)
    if wait is not None:
        raise self.retry(countdown=wait, max_retries=None)
    return {"status": "done", "id": delivery.get("body", {}).get("id")}


def configure_tasks(app: Celery, settings: Settings, device: str, *, preload: list[str] | None = None) -> None:
    """Bind darkroom's tasks on `app` to a worker's settings and device, and warm `preload` models in each pool
    process. Called in the worker's main process before the pool forks; runtimes are made after it."""
    # 1. Settings, device and models to preload: class-wide, read by the tasks and by Celery (max_retries).
    DarkroomTask.configure(settings, device, preload)
    # 2. Dead letters: Celery reports a job whose pool process died on every attempt in the main process. Only
    #    generate retries a lost worker; convert and calibrate are requeued (task_reject_on_worker_lost). Reading
    #    app.tasks finalizes the app, which makes its copies of the shared tasks.
    task_failure.connect(_on_task_failure, sender=app.tasks[GENERATE_TASK], weak=False)
    # 3. Models to keep warm from the start: loaded in each pool process as it starts, before it takes a job.
    if preload:
        worker_process_init.connect(_preload_models, weak=False, dispatch_uid="darkroom-preload")


def _on_task_failure(sender: DarkroomTask, exception: BaseException | None = None,
                     kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    if isinstance(exception, WorkerLostError):
        sender.dead_letter((kwargs or {}).get("job"), exception)


def _preload_models(**_: Any) -> None:
    from tasks.models import resolve_model

    rt = DarkroomTask.process_runtime()
    for name in DarkroomTask._preload:
        ref = resolve_model(rt.storage, name)
        rt.pool.get(ref.name, ref.precision, ref.fingerprint, width=ref.width, height=ref.height, cfg=True)
        log.info("preloaded %s (%s %s)", name, ref.precision, ref.fingerprint)
    metrics.sync_pool(rt)
