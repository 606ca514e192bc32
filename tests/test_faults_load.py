"""Fault suite, load: thousands of tiny jobs through the real pipeline drain with none lost, and no leak.

Every job is a real generation: Redis queue, `darkroom worker` prefork pool, OpenVINO UNet (tiny model, 32x32,
1 step, no CFG), PNG to storage, item record, progress in Redis, manifest last. DARKROOM_LOAD_JOBS changes the
number of jobs (default 5000).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from broker.progress import BatchProgress
from broker.settings import Settings
from darkroom import submit, submit_convert
from storage import keys, open_storage
from testkit.fleet import WorkerProcess
from tests.conftest import queue_settings_for, redis_db_url
from tests.faults import pool_children, wait_for

TINY = {"steps": 1, "width": 32, "height": 32, "guidance": 1.0, "scheduler": "euler"}
JOBS = int(os.environ.get("DARKROOM_LOAD_JOBS", "5000"))


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("load"), redis_db_url(redis_server, 5))


@pytest.fixture(scope="module")
def workers(settings: Settings, tmp_path_factory: pytest.TempPathFactory,
            tiny_sd_dir: Path) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    logs = tmp_path_factory.mktemp("load-logs")
    a = WorkerProcess(settings, ["load", "load-a", "convert"], logs / "a.log")
    b = WorkerProcess(settings, ["load"], logs / "b.log")
    try:
        a.start()
        b.start()
        outcome = submit_convert(str(tiny_sd_dir), name="tiny", settings=settings).get(timeout=600)
        assert outcome["status"] == "done", outcome
        yield a, b
    finally:
        a.stop()
        b.stop()


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_a_worker_does_not_leak_over_500_generations(settings: Settings,
                                                     workers: tuple[WorkerProcess, WorkerProcess]) -> None:
    a, _ = workers
    handle = submit([f"leak check {i}" for i in range(500)], model="tiny", seed=3, queue="load-a",
                    batch_id="leak-check", settings=settings, **TINY)
    progress = BatchProgress(settings.broker_url)
    wait_for(lambda: (progress.counts("leak-check") or handle.counts()).finished >= 50, timeout=600,
             what="50 generations", poll=0.02)
    (child,) = pool_children(a)
    after_50 = _rss(child)
    began = time.monotonic()
    summary = handle.wait(timeout=900, poll=0.2)
    took = time.monotonic() - began
    assert pool_children(a) == {child}, "the pool process was replaced: RSS would not compare"
    after_500 = _rss(child)
    assert (summary.done, summary.failed) == (500, 0)
    growth = after_500 / after_50 - 1
    print(f"\nscenario 9a: pool RSS {after_50 / 2**20:.1f} MiB after 50, {after_500 / 2**20:.1f} MiB after 500 "
          f"generations ({growth:+.1%}); 450 generations in {took:.1f} s")
    assert abs(growth) <= 0.10


def test_thousands_of_tiny_jobs_drain_with_none_lost(settings: Settings,
                                                     workers: tuple[WorkerProcess, WorkerProcess]) -> None:
    began = time.monotonic()
    handle = submit([f"load {i}" for i in range(JOBS)], model="tiny", seed=5, queue="load", batch_id="load",
                    settings=settings, **TINY)
    enqueued = time.monotonic() - began
    assert handle.enqueued == JOBS
    summary = handle.wait(timeout=1800, poll=1.0)
    took = time.monotonic() - began
    assert (summary.state, summary.done, summary.failed) == ("completed", JOBS, 0)
    storage = open_storage(settings.storage_url)
    manifest = storage.get_json(keys.batch_manifest_key("load"))
    assert [i["index"] for i in manifest["items"]] == list(range(JOBS))
    images = [k for k in storage.list_keys("images/load/") if k.endswith(".png")]
    assert len(images) == JOBS
    assert {i["worker"] for i in manifest["items"]}.__len__() == 2, "both workers should have drained the queue"
    print(f"\nscenario 9b: {JOBS} jobs enqueued in {enqueued:.1f} s and drained by 2 workers in {took:.1f} s "
          f"({JOBS / took:.0f} jobs/s); none lost, none duplicated")
