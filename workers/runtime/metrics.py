"""A worker's Prometheus metrics: images, step times, the model pool, failures.

Why multiprocess mode: Celery's prefork pool runs jobs in child processes, so the numbers are made there,
while the worker's main process is the one that lives as long as the worker. We use prometheus-client's
multiprocess mode: each pool child writes its counters to memory-mapped files in a directory
(PROMETHEUS_MULTIPROC_DIR) and one HTTP server in the main process sums them on every scrape. The other
choice, a server started in each child on worker_process_init, would give each of `--concurrency N` children a
port of its own and lose the totals whenever a child is replaced (after a crash, or a killed job); here
totals survive a child's death and one port serves the whole worker.

The mode is chosen when prometheus_client is first imported, from the environment: `serve_metrics` sets the
directory first and only then imports it, in the main process before the pool forks. Nothing here imports
prometheus_client unless metrics are being served, so processes without metrics (tests, benchmarks, the
calibration code run on its own) pay nothing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from broker.settings import METRICS_PORT_ENV

# Set by serve_metrics, inherited by the pool's children: "metrics are on, and this is their directory".
_ENV_DIR = "DARKROOM_METRICS_DIR"

PHASES = ("encode", "denoise", "decode", "total")
POOL_EVENTS = ("hits", "compiles", "fetches", "evictions")

_STEP_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

_metrics: dict[str, Any] = {}
_pool_seen: dict[str, int] = {}


def enabled() -> bool:
    return bool(os.environ.get(_ENV_DIR))


def port_from_env() -> int | None:
    """DARKROOM_METRICS_PORT, for deployments that configure workers by environment."""
    raw = os.environ.get(METRICS_PORT_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise _invalid(f"{METRICS_PORT_ENV}={raw!r} is not a TCP port")
    return int(raw)


def serve_metrics(port: int, address: str = "0.0.0.0") -> Path:
    """In the worker's main process, before the pool forks: multiprocess mode on, /metrics on `port`."""
    directory = Path(tempfile.mkdtemp(prefix="darkroom-metrics-"))
    # A fresh directory per worker run: files of an earlier run would be summed into this one's totals.
    atexit.register(shutil.rmtree, directory, True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    os.environ[_ENV_DIR] = str(directory)
    try:
        from prometheus_client import CollectorRegistry, start_http_server, values
        from prometheus_client.multiprocess import MultiProcessCollector
    except ImportError:
        raise _invalid("worker metrics need prometheus-client: install the ops extra (`pip install '.[ops]'` in "
                       "darkroom's checkout)") from None
    if not getattr(values.ValueClass, "_multiprocess", False):
        raise _invalid("prometheus_client was imported before metrics were set up; the pool's numbers "
                       "would be lost")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise _invalid(f"cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None
    return directory


def _get() -> dict[str, Any]:
    # Made on first use in the pool child (after the fork), so each child writes its own files.
    if not _metrics:
        from prometheus_client import Counter, Histogram

        _metrics.update(
            images=Counter("darkroom_images_generated", "Images rendered and stored (rate() gives images/s)",
                           ["device", "model"]),
            phase=Histogram("darkroom_generation_phase_seconds",
                            "Seconds per image in each phase: encode (text), denoise (UNet loop), decode (VAE), "
                            "total", ["device", "phase"], buckets=_PHASE_BUCKETS),
            step=Histogram("darkroom_denoise_step_seconds", "Seconds per denoising step (one UNet call, both CFG "
                           "halves)", ["device"], buckets=_STEP_BUCKETS),
            pool=Counter("darkroom_model_pool_events", "Model pool: hits (warm), compiles, fetches (IR downloaded "
                         "from storage), evictions", ["device", "event"]),
            failures=Counter("darkroom_job_failures", "Jobs that failed for good, by job kind and reason "
                             "(invalid request, transient trouble that outlasted the retries, error)",
                             ["kind", "reason"]),
            retries=Counter("darkroom_job_retries", "Retries of jobs after transient trouble", ["kind"]),
        )
    return _metrics


def observe_image(device: str, model: str, timings: Mapping[str, float], steps: int) -> None:
    """One image rendered and stored, with its GenerationResult.timings."""
    if not enabled():
        return
    m = _get()
    m["images"].labels(device, model).inc()
    for phase in PHASES:
        if phase in timings:
            m["phase"].labels(device, phase).observe(timings[phase])
    if steps > 0 and "denoise" in timings:
        m["step"].labels(device).observe(timings["denoise"] / steps)


def observe_failure(kind: str, reason: str) -> None:
    if enabled():
        _get()["failures"].labels(kind, reason).inc()


def observe_retry(kind: str) -> None:
    if enabled():
        _get()["retries"].labels(kind).inc()


def sync_pool(runtime: Any) -> None:
    """Add what the runtime's model pool counted since the last call (PoolStats counts per process)."""
    if not enabled():
        return
    # cached_property keeps the pool in the instance dict: a job that never made one has nothing to add.
    pool = vars(runtime).get("pool")
    if pool is None:
        return
    counter = _get()["pool"]
    for event in POOL_EVENTS:
        now = int(getattr(pool.stats, event))
        delta = now - _pool_seen.get(event, 0)
        if delta > 0:
            counter.labels(runtime.device, event).inc(delta)
        _pool_seen[event] = now


def _invalid(message: str) -> Exception:
    # An InvalidRequest: the `darkroom` command reports it as one line and exit status 2.
    from tasks.errors import InvalidRequest

    return InvalidRequest(message, field="metrics")
