"""Prometheus metrics on real parts: a real worker with a metrics port, and the `darkroom metrics` exporter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.app import make_app
from broker.embedded import free_port
from broker.progress import BatchProgress
from broker.settings import Settings
from darkroom import BatchHandle, BatchSummary, submit, submit_convert
from darkroom.submit import send_jobs
from tasks.names import GENERATE_TASK
from tasks.schemas import GenerateJob
from testkit.fleet import REPO, WorkerProcess
from tests.conftest import queue_settings_for, redis_db_url

FAST = {"steps": 3, "width": 64, "height": 64}
BATCH_SIZE = 4

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("metrics"), redis_db_url(redis_server, 12))


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, str]]:
    """One worker with metrics on a free port (set through the environment, as a deployment may)."""
    port = free_port()
    w = WorkerProcess(settings, ["generate.CPU", "convert"], tmp_path_factory.mktemp("logs") / "worker.log",
                      extra_env={"DARKROOM_METRICS_PORT": str(port), "DARKROOM_METRICS_ADDRESS": "127.0.0.1"})
    try:
        yield w.start(timeout=300), f"http://127.0.0.1:{port}/metrics"
    finally:
        w.stop()


@pytest.fixture(scope="module")
def rendered(worker: tuple[WorkerProcess, str], tiny_sd_dir: Path, settings: Settings) -> BatchSummary:
    outcome = submit_convert(str(tiny_sd_dir), name="tiny", weight_format="fp32", settings=settings).get(timeout=600)
    assert outcome["status"] == "done", outcome
    handle = submit([f"metered {i}" for i in range(BATCH_SIZE)], model="tiny", seed=5, batch_id="metered",
                    settings=settings, **FAST)
    summary = handle.wait(timeout=600)
    assert (summary.done, summary.failed) == (BATCH_SIZE, 0)
    return summary


@pytest.fixture(scope="module")
def exporter(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("exporter") / "exporter.log"
    env = {**os.environ, **settings.as_env(), "PYTHONPATH": str(REPO)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "darkroom", "metrics", "--port", str(port), "--address", "127.0.0.1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                scrape(url)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the exporter did not start:\n{log_path.read_text(errors='replace')}")
                time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_rendered_batch_shows_in_the_worker_metrics(worker: tuple[WorkerProcess, str],
                                                     rendered: BatchSummary) -> None:
    samples = scrape(worker[1])
    assert value(samples, "darkroom_images_generated_total", device="CPU", model="tiny") == BATCH_SIZE
    # One shape, one artifact: fetched and compiled once, then warm.
    assert value(samples, "darkroom_model_pool_events_total", device="CPU", event="compiles") >= 1
    assert value(samples, "darkroom_model_pool_events_total", device="CPU", event="fetches") >= 1
    assert value(samples, "darkroom_model_pool_events_total", device="CPU", event="hits") >= BATCH_SIZE - 1
    for phase in ("encode", "denoise", "decode", "total"):
        assert value(samples, "darkroom_generation_phase_seconds_count", device="CPU", phase=phase) == BATCH_SIZE
        assert value(samples, "darkroom_generation_phase_seconds_sum", device="CPU", phase=phase) > 0
    assert value(samples, "darkroom_denoise_step_seconds_count", device="CPU") == BATCH_SIZE
    step = value(samples, "darkroom_denoise_step_seconds_sum", device="CPU") / BATCH_SIZE
    denoise = value(samples, "darkroom_generation_phase_seconds_sum", device="CPU", phase="denoise") / BATCH_SIZE
    assert step == pytest.approx(denoise / FAST["steps"])


def test_a_failing_item_is_counted_by_kind_and_reason(worker: tuple[WorkerProcess, str], rendered: BatchSummary,
                                                      settings: Settings) -> None:
    before = value(scrape(worker[1]), "darkroom_job_failures_total", kind="generate", reason="invalid") or 0
    # As in test_queue: one more item of the batch, whose artifact does not exist.
    BatchProgress(settings.broker_url).client.hset("darkroom:batch:metered:meta", "total", BATCH_SIZE + 1)
    bad = GenerateJob(batch_id="metered", index=BATCH_SIZE, prompt="lost", seed=4, guidance=7.5, scheduler="pndm",
                      model="tiny", precision="fp32", fingerprint="0" * 16, **FAST)
    send_jobs([bad], settings, queue="generate.CPU")
    summary = BatchHandle("metered", BATCH_SIZE + 1, settings).wait(timeout=300)
    assert summary.failed == 1
    samples = scrape(worker[1])
    assert value(samples, "darkroom_job_failures_total", kind="generate", reason="invalid") == before + 1
    assert value(samples, "darkroom_images_generated_total", device="CPU", model="tiny") == BATCH_SIZE


def test_the_exporter_shows_queue_depth_and_batch_progress(exporter: str, rendered: BatchSummary,
                                                           settings: Settings) -> None:
    # No worker consumes generate.NPU here: what is sent there waits, and the exporter finds the queue itself.
    app = make_app(settings)
    try:
        for n in range(5):
            app.send_task(GENERATE_TASK, kwargs={"job": {"batch_id": "never", "index": n}}, queue="generate.NPU")
    finally:
        app.close()
    progress = BatchProgress(settings.broker_url)
    try:
        samples = scrape(exporter)
        assert value(samples, "darkroom_broker_up") == 1
        assert value(samples, "darkroom_queue_depth", queue="generate.NPU", kind="generate", device="NPU") == 5
        assert value(samples, "darkroom_queue_depth", queue="convert", kind="convert", device="") == 0
        assert value(samples, "darkroom_queue_depth", queue="calibrate", kind="calibrate", device="") == 0
        assert value(samples, "darkroom_queue_depth", queue="generate.CPU", kind="generate", device="CPU") == 0
        counts = progress.counts(rendered.batch_id)
        assert counts is not None
        for state in ("total", "done", "failed"):
            assert value(samples, "darkroom_batch_items", batch=rendered.batch_id, state=state) == getattr(counts,
                                                                                                            state)
        assert value(samples, "darkroom_batches", state=counts.state) >= 1
        # Redis drops an emptied list; the exporter keeps reporting the queue, at 0.
        progress.client.delete("generate.NPU")
        assert value(scrape(exporter), "darkroom_queue_depth", queue="generate.NPU", kind="generate",
                     device="NPU") == 0
    finally:
        progress.client.delete("generate.NPU")
        progress.close()


def test_the_exporter_on_a_taken_port_is_one_clear_line(exporter: str, settings: Settings) -> None:
    taken = exporter.split(":")[2].split("/")[0]
    done = subprocess.run([sys.executable, "-m", "darkroom", "metrics", "--port", taken, "--address",
                           "127.0.0.1"], env={**os.environ, **settings.as_env(), "PYTHONPATH": str(REPO)},
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"darkroom: error: metrics: cannot serve metrics on 127.0.0.1:{taken}: " \
                                  "Address already in use"


def test_a_taken_metrics_port_is_one_clear_line(worker: tuple[WorkerProcess, str], settings: Settings) -> None:
    # The flags this time (the module's worker got its port from the environment).
    taken = worker[1].split(":")[2].split("/")[0]
    done = subprocess.run([sys.executable, "-m", "darkroom", "worker", "--device", "CPU", "--queues",
                           "nothing-here", "--metrics-port", taken, "--metrics-address", "127.0.0.1"],
                          env={**os.environ, **settings.as_env(), "PYTHONPATH": str(REPO)}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"cannot serve metrics on 127.0.0.1:{taken}" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
