"""The Celery application, built from settings by a function: nothing connects at import."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery
from kombu import Queue

from broker.settings import Settings
from broker.tls import ssl_options
from tasks.names import (
    CALIBRATE_QUEUE,
    CALIBRATE_TASK,
    CONVERT_QUEUE,
    CONVERT_TASK,
    DEFAULT_DEVICE,
    GC_TASK,
    GENERATE_TASK,
    MAINTENANCE_QUEUE,
    generate_queue,
    priority_queue,
)


def make_app(settings: Settings) -> Celery:
    """A Celery app for producers and workers alike; workers register their tasks on it."""
    app = Celery("darkroom", broker=settings.broker_url, backend=settings.backend_url, set_as_current=False)
    app.conf.update(
        # JSON only on the wire: a pickled message is refused, never executed.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # Every job may run twice: ack after the job, requeue when a worker dies, take one at a time.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Sweep for messages of dead workers every 10 s instead of kombu's default ~100 s; a message
            # is handed back once it has been unacknowledged for the visibility timeout.
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            # A worker's queues are consumed strictly in the order it lists them (with_priorities: every high
            # queue first, every low one last), not round robin: a high batch's items go first on every worker.
            "queue_order_strategy": "priority",
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        result_expires=settings.progress_ttl,
        task_default_queue=generate_queue(DEFAULT_DEVICE),
        task_routes={CONVERT_TASK: {"queue": CONVERT_QUEUE}, CALIBRATE_TASK: {"queue": CALIBRATE_QUEUE},
                     GENERATE_TASK: {"queue": generate_queue(DEFAULT_DEVICE)}, GC_TASK: {"queue": MAINTENANCE_QUEUE}},
        task_track_started=True,
        task_send_sent_event=True,
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
        # celery-redbeat: schedules live in Redis; a standby beat takes over 25 s after the active one dies.
        redbeat_redis_url=settings.broker_url,
        redbeat_key_prefix="darkroom:beat:",
        redbeat_lock_timeout=25,
        redbeat_redis_options={},
        beat_max_loop_interval=5,
    )
    # rediss:// URLs: TLS options from the URL's query string (broker/tls.py).
    if (broker_ssl := ssl_options(settings.broker_url)) is not None:
        app.conf.broker_use_ssl = broker_ssl
    if (backend_ssl := ssl_options(settings.backend_url)) is not None:
        app.conf.redis_backend_use_ssl = backend_ssl
    return app


def task_sender(settings: Settings) -> Callable[[str, dict[str, Any], str, str], None]:
    """Sends a task by name (name, kwargs, queue, task id) on an app made on first use: handed to code that must
    send one without importing Celery (broker/webhooks.py, via broker/manifest.py)."""
    app: list[Celery] = []

    def send(name: str, kwargs: dict[str, Any], queue: str, task_id: str) -> None:
        if not app:
            app.append(make_app(settings))
        app[0].send_task(name, kwargs=kwargs, queue=queue, task_id=task_id)

    return send


def worker_queues(device: str, extra: list[str] | None = None) -> list[Queue]:
    """The queues a worker pinned to `device` consumes: its generation queue plus any extra ones."""
    names = [generate_queue(device), *(extra or [])]
    return [Queue(name) for name in dict.fromkeys(names)]


KNOWN_QUEUES = (CONVERT_QUEUE, CALIBRATE_QUEUE, MAINTENANCE_QUEUE)


def with_priorities(queues: list[str]) -> list[str]:
    """A worker's queues in the order it consumes them: each generation queue's high queue first, then the queues
    as given, then each generation queue's low queue (conversion, calibration and maintenance have no priority)."""
    generation = [q for q in queues if q not in KNOWN_QUEUES]
    ordered = [*(priority_queue(q, "high") for q in generation), *queues,
               *(priority_queue(q, "low") for q in generation)]
    return list(dict.fromkeys(ordered))
