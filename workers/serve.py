"""Start a Celery worker pinned to one OpenVINO device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from broker.app import make_app, with_priorities
from broker.progress import BatchProgress
from broker.settings import METRICS_ADDRESS_ENV, Settings
from tasks.names import generate_queue
from workers.celery_tasks import configure_tasks
from workers.runtime import metrics
from workers.runtime.device import InvalidCores, UnknownDevice, check_device, parse_cores, pin_to_cores


def probe_devices() -> list[str]:
    """OpenVINO's devices, asked in a child process so no OpenVINO state is inherited by the pool's forks."""
    code = "import json, openvino as ov; print(json.dumps(ov.Core().available_devices))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_worker(settings: Settings, *, device: str, queues: list[str] | None = None,
               preload: list[str] | None = None, concurrency: int = 1, loglevel: str = "INFO",
               metrics_port: int | None = None, metrics_address: str | None = None, cores: str | None = None) -> None:
    """Blocks until the worker shuts down (SIGTERM/SIGINT: warm shutdown, the running job finishes)."""
    # 1. The device must exist here, or nothing this worker takes could run; the cores too, if named. Pinning
    #    happens before the pool forks, so every pool process inherits it.
    pinned = parse_cores(cores) if cores else None
    device = check_device(device, probe_devices())
    if pinned:
        pin_to_cores(pinned)
    # 2. The broker must answer now, with a clear message if not (Celery would retry silently).
    BatchProgress(settings.broker_url).ping()
    # 3. The app, its tasks bound to these settings and this device, and the queues: this device's generation
    #    queue unless told otherwise.
    app = make_app(settings)
    configure_tasks(app, settings, device, preload=preload)
    names = with_priorities(queues or [generate_queue(device)])
    argv = ["worker", "-Q", ",".join(names), "-c", str(concurrency), "-P", "prefork",
            "-n", f"darkroom-{device}-{os.getpid()}@%h", "--loglevel", loglevel, "-E",
            "--without-mingle", "--without-gossip"]
    # 4. Prometheus metrics (off unless a port is given, here or in DARKROOM_METRICS_PORT), before the pool forks.
    metrics_port = metrics_port or metrics.port_from_env()
    if metrics_port:
        metrics.serve_metrics(metrics_port, metrics_address or os.environ.get(METRICS_ADDRESS_ENV) or "0.0.0.0")
    app.worker_main(argv)


__all__ = ["InvalidCores", "UnknownDevice", "probe_devices", "run_worker"]
