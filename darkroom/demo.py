"""`darkroom demo`: the whole system on one machine with embedded defaults, started and stopped cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from broker.settings import Settings
from darkroom import submit
from darkroom.contact_sheet import write_contact_sheet
from darkroom.convert import submit_convert
from darkroom.demo_model import shipped_model_dir
from darkroom.progress_view import print_summary, wait_with_progress
from storage import keys, open_storage

DEMO_MODEL = "demo-shapes"
# The built-in model draws one coloured shape (darkroom/data/demo-model/README.md): prompts from its grammar.
DEMO_PROMPTS = [
    "a red circle", "a green square", "a blue triangle", "a yellow circle", "a red square", "a green triangle",
    "a blue circle", "a yellow square", "a red triangle", "a green circle", "a blue square", "a yellow triangle",
]
DEMO_GUIDANCE = 6.0


def run_demo(data_dir: Path, *, steps: int = 20, size: int = 64, seed: int = 42) -> int:
    """Embedded Redis, one CPU worker, local storage under `data_dir`; everything stops on exit or Ctrl-C."""
    from broker.embedded import EmbeddedRedis

    # Ctrl-C and SIGTERM both end in the `finally` below, even when started with SIGINT ignored
    # (a background job of a non-interactive shell inherits that).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    # Service state lives beside the objects, in a dot folder the storage layout never uses.
    local = data_dir / ".local"
    redis_server = EmbeddedRedis.start(data_dir=local / "redis")
    worker: subprocess.Popen[bytes] | None = None
    try:
        settings = Settings(broker_url=redis_server.url, storage_url=str(data_dir),
                            cache_dir=local / "cache")
        print(f"[1/5] Redis on {redis_server.url}; storage in {data_dir}")
        source = _demo_model()
        worker = _start_worker(settings, local / "worker.log")
        print(f"[3/5] worker pid {worker.pid} on device CPU (log: {local / 'worker.log'})")
        _convert(source, settings)
        return _render(settings, steps=steps, size=size, seed=seed)
    finally:
        _stop_worker(worker)
        redis_server.stop()
        print("stopped the worker and Redis")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _demo_model() -> Path:
    source = shipped_model_dir()
    print(f"[2/5] the built-in demo model (trained to draw coloured shapes) at {source}")
    return source


def _start_worker(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, **settings.as_env()}
    log = log_path.open("ab")
    # Its own session: Ctrl-C reaches the demo, which then shuts the worker down in order.
    return subprocess.Popen(
        [sys.executable, "-m", "darkroom", "worker", "--device", "CPU", "--queues", "generate.CPU,convert",
         "--loglevel", "WARNING"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _convert(source: Path, settings: Settings) -> None:
    started = time.perf_counter()
    outcome = submit_convert(str(source), name=DEMO_MODEL, settings=settings).get(timeout=900)
    if outcome.get("status") != "done":
        raise RuntimeError(f"conversion failed: {outcome.get('error')}")
    print(f"[4/5] converted to OpenVINO IR: {outcome['uri']} ({time.perf_counter() - started:.1f} s)")


def _render(settings: Settings, *, steps: int, size: int, seed: int) -> int:
    handle = submit(DEMO_PROMPTS, model=DEMO_MODEL, steps=steps, width=size, height=size, seed=seed,
                    guidance=DEMO_GUIDANCE, settings=settings)
    print(f"[5/5] batch {handle.batch_id}: {handle.total} prompts through the queue")
    summary = wait_with_progress(handle, quiet=False, timeout=1800)
    print_summary(summary, as_json=False)
    storage = open_storage(settings.storage_url)
    sheet = write_contact_sheet(storage, summary.batch_id, list(summary.items))
    print(f"images: {storage.uri(keys.batch_images_prefix(summary.batch_id))}")
    print(f"contact sheet: {sheet}")
    return 1 if summary.failed else 0


def _stop_worker(worker: subprocess.Popen[bytes] | None) -> None:
    if worker is None or worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)  # Celery's warm shutdown: the running job finishes
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
