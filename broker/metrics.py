"""`darkroom metrics`: a Prometheus exporter of queue depth and batch progress, read from Redis on each scrape.

It asks Redis on every scrape rather than on a timer, so a scrape shows the queues as they are, and an exporter
nobody scrapes costs nothing. Queue depth is the length of the queue's Redis list (kombu's Redis transport keeps
each queue as a list named after it); workers' own numbers come from their `--metrics-port`.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import redis

from broker.progress import BatchCounts
from broker.settings import Settings, redact_url
from tasks.errors import InvalidRequest
from tasks.names import CALIBRATE_QUEUE, CONVERT_QUEUE, MAINTENANCE_QUEUE, generate_queue, split_priority

# kombu's Redis transport puts messages with a priority in lists named queue + this + the priority step.
PRIORITY_SEPARATOR = "\x06\x16"
GENERATE_PREFIX = generate_queue("")
# Per-batch series are kept for unfinished batches and for those created in the last hour, at most this many:
# Redis keeps progress for two weeks, and one series per batch ever made would grow without bound.
MAX_BATCH_SERIES = 100
RECENT_SECONDS = 3600.0


@dataclass(frozen=True)
class QueueDepth:
    queue: str
    kind: str
    device: str
    messages: int


def queue_kind(queue: str) -> tuple[str, str]:
    """(job kind, device) of a queue name: generate.GPU.0 -> (generate, GPU.0), convert -> (convert, ""); a
    priority's queue counts for its device (generate.CPU.high -> (generate, CPU))."""
    if queue.startswith(GENERATE_PREFIX):
        return "generate", split_priority(queue)[0][len(GENERATE_PREFIX):]
    if queue in (CONVERT_QUEUE, CALIBRATE_QUEUE, MAINTENANCE_QUEUE):
        return queue, ""
    return "other", ""


class QueueReader:
    """Queue depths and batch progress straight from the broker's Redis."""

    def __init__(self, broker_url: str, *, queues: Iterable[str] = ()) -> None:
        self.broker_url = broker_url
        self.client = redis.Redis.from_url(broker_url, decode_responses=True, socket_connect_timeout=5,
                                           socket_timeout=10)
        # Redis drops a list when it empties: a queue seen once is still reported, at 0, rather than vanishing.
        self.known = {CONVERT_QUEUE, CALIBRATE_QUEUE, MAINTENANCE_QUEUE, *queues}

    def queue_depths(self) -> list[QueueDepth]:
        for key in self.client.scan_iter(match=f"{GENERATE_PREFIX}*", _type="list", count=500):
            self.known.add(key.split(PRIORITY_SEPARATOR, 1)[0])
        names = sorted(self.known)
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.llen(name)
            for step in (3, 6, 9):  # kombu's default priority steps; 0 is the plain list
                pipe.llen(f"{name}{PRIORITY_SEPARATOR}{step}")
        lengths = pipe.execute()
        depths = []
        for n, name in enumerate(names):
            kind, device = queue_kind(name)
            depths.append(QueueDepth(name, kind, device, sum(lengths[4 * n:4 * n + 4])))
        return depths

    def unacked(self) -> int:
        """Messages delivered to a worker and not yet acknowledged (running, or held by a dead worker)."""
        return int(self.client.hlen("unacked"))

    def batches(self) -> list[tuple[BatchCounts, float]]:
        """(counts, created) of every batch Redis still holds progress for."""
        keys = list(self.client.scan_iter(match="darkroom:batch:*:meta", count=500))
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, "total", "done", "failed", "created")
        out = []
        for key, (total, done, failed, created) in zip(keys, pipe.execute(), strict=True):
            if total is None:
                continue
            batch_id = key.removeprefix("darkroom:batch:").removesuffix(":meta")
            counts = BatchCounts(batch_id, int(total), int(done or 0), int(failed or 0))
            out.append((counts, float(created or 0)))
        return out

    def close(self) -> None:
        self.client.close()


class DarkroomCollector:
    """A prometheus-client collector: every scrape reads Redis once."""

    def __init__(self, reader: QueueReader) -> None:
        self.reader = reader

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("darkroom_broker_up", "1 if the broker's Redis answered this scrape, else 0")
        started = time.perf_counter()
        try:
            depths = self.reader.queue_depths()
            unacked = self.reader.unacked()
            batches = self.reader.batches()
        except (redis.RedisError, OSError) as exc:
            print(f"darkroom metrics: broker at {redact_url(self.reader.broker_url)}: {exc}", file=sys.stderr)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("darkroom_queue_depth", "Messages waiting in a queue (Redis LLEN)",
                                  labels=["queue", "kind", "device"])
        for d in depths:
            depth.add_metric([d.queue, d.kind, d.device], d.messages)
        yield depth
        yield GaugeMetricFamily("darkroom_unacked_messages", "Messages taken by workers and not yet acknowledged",
                                value=unacked)
        yield from _batch_metrics(batches, time.time())
        yield GaugeMetricFamily("darkroom_exporter_scrape_seconds", "Seconds this scrape spent reading Redis",
                                value=time.perf_counter() - started)


def _batch_metrics(batches: list[tuple[BatchCounts, float]], now: float) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    by_state = GaugeMetricFamily("darkroom_batches", "Batches whose progress Redis holds, by state",
                                 labels=["state"])
    states = {"queued": 0, "running": 0, "completed": 0, "completed_with_failures": 0}
    for counts, _ in batches:
        states[counts.state] = states.get(counts.state, 0) + 1
    for state, n in states.items():
        by_state.add_metric([state], n)
    yield by_state
    items = GaugeMetricFamily("darkroom_batch_items", "Items of an unfinished or recent batch: total, done, failed",
                              labels=["batch", "state"])
    shown = [(c, created) for c, created in batches
             if c.finished < c.total or now - created < RECENT_SECONDS]
    for counts, _ in sorted(shown, key=lambda b: b[1], reverse=True)[:MAX_BATCH_SERIES]:
        for state, value in (("total", counts.total), ("done", counts.done), ("failed", counts.failed)):
            items.add_metric([counts.batch_id, state], value)
    yield items


def make_registry(reader: QueueReader) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(DarkroomCollector(reader))
    return registry


def serve_exporter(settings: Settings, *, port: int, address: str, queues: Iterable[str] = ()) -> None:
    """Serve /metrics until SIGTERM or SIGINT."""
    from prometheus_client import start_http_server

    reader = QueueReader(settings.broker_url, queues=queues)
    try:
        reader.client.ping()
    except (redis.RedisError, OSError) as exc:
        # Keep serving: darkroom_broker_up says 0 until Redis answers (it may just be starting).
        print(f"darkroom metrics: broker at {redact_url(settings.broker_url)} not answering yet: {exc}",
              file=sys.stderr)
    try:
        server, thread = start_http_server(port, addr=address, registry=make_registry(reader))
    except OSError as exc:
        reader.close()
        raise InvalidRequest(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}",
                             field="metrics") from None
    print(f"darkroom metrics: serving http://{address}:{server.server_port}/metrics", file=sys.stderr, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        reader.close()
