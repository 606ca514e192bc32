"""Fault suite, workers: real Redis, real `darkroom worker` processes, real OpenVINO, killed and stopped mid-job.

Each scenario runs the same 8-item batch (tests/faults.py) on its own queue and checks: every item has exactly
one manifest entry and one image, each image is byte-identical to an undisturbed run, and the batch ends in a
clear final state. Test-only faults (workers/runtime/faults.py) make the UNet loop slow enough to be hit mid-loop.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from broker.progress import BatchProgress
from broker.settings import Settings
from darkroom import submit_convert
from storage import keys, open_storage
from testkit.fleet import REPO, WorkerProcess
from tests.conftest import queue_settings_for, redis_db_url
from tests.faults import (
    PROMPTS,
    RENDER,
    SEED,
    Farm,
    check_batch,
    farm,
    kill_group,
    mid_unet,
    overlapping_runs,
    pool_children,
    unet_steps,
    wait_for,
)
from workers.runtime.delivery import dead_letters

SLOW = "slow-unet:0.4"


@pytest.fixture(scope="module")
def base(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("faults"), redis_db_url(redis_server, 4))


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault-logs")


@pytest.fixture(scope="module")
def reference(base: Settings, logs: Path, tiny_sd_dir: Path) -> Iterator[dict[int, bytes]]:
    """Convert the tiny model, then render the batch once, undisturbed: the bytes every scenario must match."""
    worker = WorkerProcess(base, ["convert", "faults-reference"], logs / "reference.log")
    worker.start()
    try:
        outcome = submit_convert(str(tiny_sd_dir), name="tiny", weight_format="fp32", settings=base).get(timeout=600)
        assert outcome["status"] == "done", outcome
        f = Farm(base, "faults-reference", logs)
        handle = f.submit(batch_id="reference")
        assert handle.wait(timeout=600).done == len(PROMPTS)
    finally:
        worker.stop()
    storage = open_storage(base.storage_url)
    images = {i: storage.get_bytes(keys.image_key("reference", i)) for i in range(len(PROMPTS))}
    assert len(set(images.values())) == len(PROMPTS)
    yield images


def _storage(settings: Settings):  # noqa: ANN202
    return open_storage(settings.storage_url)


def test_sigkill_of_the_pool_process_mid_unet_loop(base: Settings, logs: Path, reference: dict[int, bytes]) -> None:
    with farm(base, "faults-child", logs) as f:
        worker = f.start("w", faults=SLOW)
        handle = f.submit(batch_id="child-killed")
        step = mid_unet(f, "child-killed")
        assert step.pid in pool_children(worker)
        os.kill(step.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        index = int(step.item.rsplit(".", 1)[1])
        progress = BatchProgress(base.broker_url)
        wait_for(lambda: progress.status_of("child-killed").get(index) == "done", timeout=300,
                 what=f"item {index} after the kill")
        recovery = time.monotonic() - killed_at
        summary = handle.wait(timeout=300)
    manifest = check_batch(_storage(base), "child-killed", reference)
    item = next(i for i in manifest["items"] if i["index"] == index)
    assert item["attempts"] == 2 and not item["worker"].endswith(f":{step.pid}")
    assert summary.state == "completed"
    print(f"\nscenario 1: pool process killed at UNet step {step.step} of item {index}; item done "
          f"{recovery:.1f} s later (retried after 1 s on a new pool process)")


def test_sigkill_of_the_whole_worker_another_finishes_within_the_bound(base: Settings, logs: Path,
                                                                        reference: dict[int, bytes]) -> None:
    visibility, sweep = 15, 10
    with farm(base, "faults-whole", logs, visibility_timeout=visibility) as f:
        doomed = f.start("doomed", faults=SLOW)
        survivor = f.start("survivor", faults=SLOW)
        handle = f.submit(batch_id="worker-killed")
        step = mid_unet(f, "worker-killed", pids=pool_children(doomed), warm=True)
        kill_group(doomed)
        killed_at = time.monotonic()
        index = int(step.item.rsplit(".", 1)[1])
        progress = BatchProgress(base.broker_url)
        wait_for(lambda: progress.status_of("worker-killed").get(index) == "done", timeout=180,
                 what=f"item {index} of the killed worker")
        recovery = time.monotonic() - killed_at
        handle.wait(timeout=300)
        assert survivor.process is not None and survivor.process.poll() is None
    manifest = check_batch(_storage(base), "worker-killed", reference)
    item = next(i for i in manifest["items"] if i["index"] == index)
    assert not item["worker"].endswith(f":{step.pid}") and item["attempts"] == 1
    # The bound: the visibility timeout, plus one restore sweep, plus the job itself (a few seconds here).
    bound = visibility + sweep + 30
    assert recovery < bound, f"item {index} came back after {recovery:.0f} s, bound {bound} s"
    # The job was delivered a few seconds before the kill; it comes back only once the timeout has passed.
    assert recovery >= visibility - 8, "handed back before the visibility timeout: not what this test measures"
    print(f"\nscenario 2: whole worker SIGKILLed mid-UNet; item {index} finished by the other worker "
          f"{recovery:.1f} s later (visibility timeout {visibility} s + sweep <= {sweep} s + job)")


def test_sigterm_warm_shutdown_finishes_the_running_job(base: Settings, logs: Path,
                                                        reference: dict[int, bytes]) -> None:
    with farm(base, "faults-term", logs) as f:
        leaving = f.start("leaving", faults=SLOW)
        f.start("staying", faults=SLOW)
        handle = f.submit(batch_id="warm-shutdown")
        step = mid_unet(f, "warm-shutdown", pids=pool_children(leaving))
        assert leaving.process is not None
        leaving.process.send_signal(signal.SIGTERM)
        began = time.monotonic()
        code = leaving.process.wait(timeout=120)
        shutdown = time.monotonic() - began
        handle.wait(timeout=300)
    assert code == 0, leaving.log_tail()
    manifest = check_batch(_storage(base), "warm-shutdown", reference)
    index = int(step.item.rsplit(".", 1)[1])
    item = next(i for i in manifest["items"] if i["index"] == index)
    # Warm shutdown: the job it was running was finished by that very process, once.
    assert item["worker"].endswith(f":{step.pid}") and item["attempts"] == 1
    print(f"\nscenario 3: SIGTERM mid-UNet; the worker finished item {index} and exited 0 after {shutdown:.1f} s")


def test_a_job_longer_than_the_visibility_timeout_never_runs_twice_at_once(base: Settings, logs: Path,
                                                                           reference: dict[int, bytes]) -> None:
    # Jobs of ~12 s with a 3 s visibility timeout: Redis hands each one to the other worker while it runs.
    with farm(base, "faults-long", logs, visibility_timeout=3) as f:
        f.start("a", faults="slow-unet:2.5")
        f.start("b", faults="slow-unet:2.5")
        handle = f.submit(PROMPTS[:3], batch_id="longer-than-visibility")
        summary = handle.wait(timeout=400)
        deferred = f.logs_text().count("is running elsewhere")
    assert summary.state == "completed"
    steps = [s for s in unet_steps(f.fault_log) if s.item.startswith("longer-than-visibility.")]
    assert overlapping_runs(steps) == []
    assert deferred >= 1, "no second delivery happened: the scenario did not exercise the lock"
    check_batch(_storage(base), "longer-than-visibility", reference)
    print(f"\nscenario 6: {deferred} second deliveries deferred by the item lock; no item ran twice at once")


def test_a_poison_item_is_dead_lettered_and_the_batch_completes(base: Settings, logs: Path,
                                                               reference: dict[int, bytes]) -> None:
    prompts = list(PROMPTS)
    prompts[5] = "POISON " + prompts[5]
    with farm(base, "faults-poison", logs) as f:
        f.start("w", faults="crash-on-prompt:POISON")
        handle = f.submit(prompts, batch_id="with-poison")
        began = time.monotonic()
        summary = handle.wait(timeout=400)
        took = time.monotonic() - began
    assert (summary.state, summary.done, summary.failed) == ("completed_with_failures", 7, 1)
    manifest = check_batch(_storage(base), "with-poison", reference, state="completed_with_failures",
                           failed=frozenset({5}))
    attempts = base.max_retries + 1
    item = next(i for i in manifest["items"] if i["index"] == 5)
    assert item["error"].startswith(f"dead letter after {attempts} attempts: WorkerLostError")
    assert "SIGKILL" in item["error"]
    dead = dead_letters(BatchProgress(base.broker_url).client, "with-poison")
    assert list(dead) == [5] and dead[5]["attempts"] == attempts and dead[5]["job"]["prompt"] == prompts[5]
    # It crashed exactly `attempts` times, each in a fresh pool process, and was then left alone.
    crashes = {s.pid for s in unet_steps(f.fault_log) if s.item == "with-poison.5" and s.step == 2}
    assert len(crashes) == attempts
    print(f"\nscenario 7: poison item dead-lettered after {attempts} crashes; batch ended in {took:.1f} s: "
          f"{json.dumps(dead[5]['error'])}")


def test_the_same_batch_submitted_twice_is_idempotent(base: Settings, logs: Path,
                                                      reference: dict[int, bytes]) -> None:
    with farm(base, "faults-twice", logs) as f:
        f.start("a", faults=SLOW)
        f.start("b", faults=SLOW)
        first = f.submit(batch_id="submitted-twice")
        mid_unet(f, "submitted-twice")
        second = f.submit(batch_id="submitted-twice")  # while the first is running: unfinished items again
        assert first.enqueued == len(PROMPTS) and 0 < second.enqueued <= len(PROMPTS)
        summary = second.wait(timeout=400)
        third = f.submit(batch_id="submitted-twice")  # after it finished: nothing to do
    assert third.enqueued == 0
    assert (summary.state, summary.done, len(summary.items)) == ("completed", len(PROMPTS), len(PROMPTS))
    steps = [s for s in unet_steps(f.fault_log) if s.item.startswith("submitted-twice.")]
    assert overlapping_runs(steps) == []
    check_batch(_storage(base), "submitted-twice", reference)
    print(f"\nscenario 8: resubmitted while running ({second.enqueued} re-enqueued) and after (0): "
          f"{len(PROMPTS)} items, one image each")


def test_redis_restarted_mid_batch_workers_and_producer_reconnect(base: Settings, logs: Path, tmp_path: Path,
                                                                  reference: dict[int, bytes]) -> None:
    from broker.embedded import EmbeddedRedis

    redis = EmbeddedRedis.start(password="fault-suite-redis", appendonly=True, data_dir=tmp_path / "redis")
    settings = replace(base, broker_url=redis.url, visibility_timeout=15)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    try:
        with farm(settings, "faults-redis", logs) as f:
            f.start("a", faults=SLOW)
            f.start("b", faults=SLOW)
            producer = subprocess.Popen(
                [sys.executable, "-m", "darkroom", "submit", str(prompts), "--model", "tiny", "--seed", str(SEED),
                 "--steps", str(RENDER["steps"]), "--batch-id", "redis-restart", "--queue", f.queue,
                 "--wait", "--json"],
                env={**os.environ, **settings.as_env(), "PYTHONPATH": str(REPO)}, cwd=REPO,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            progress = BatchProgress(settings.broker_url)
            wait_for(lambda: 2 <= progress.client.hlen("darkroom:batch:redis-restart:status") < len(PROMPTS),
                     timeout=300, what="two items done before the restart")
            before = progress.status_of("redis-restart")
            progress.close()
            redis.restart()  # SIGTERM (AOF flushed), then the same port and data dir
            restarted = time.monotonic()
            out, err = producer.communicate(timeout=300)
            recovery = time.monotonic() - restarted
    finally:
        redis.stop()
    assert producer.returncode == 0, err
    report = json.loads(out)
    assert (report["state"], report["done"]) == ("completed", len(PROMPTS)), report
    assert "Traceback" not in err
    check_batch(_storage(base), "redis-restart", reference)
    print(f"\nscenario 4: Redis restarted with {len(before)} of {len(PROMPTS)} items done; workers and the "
          f"waiting producer reconnected, batch completed {recovery:.1f} s after the restart")


def test_s3_outage_of_30_s_mid_batch_is_retried_with_backoff(base: Settings, logs: Path, tmp_path: Path,
                                                             reference: dict[int, bytes],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.s3 import S3Storage
    from testkit.services import SeaweedS3
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, s3_env

    server = SeaweedS3.start(tmp_path / "seaweed", access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
    try:
        s3 = S3Storage("faults", "darkroom", endpoint_url=server.endpoint, access_key=S3_ACCESS_KEY,
                       secret_key=S3_SECRET_KEY)
        s3.ensure_bucket()
        local = _storage(base)
        for key in local.list_keys("models/"):  # the converted model, as it lies in the local store
            s3.put_bytes(key, local.get_bytes(key))
        env = s3_env(server.endpoint)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        # 8 retries with backoff 1, 2, 4, ... 60 s (half of it at least, with jitter) outlast a 30 s outage.
        with farm(base, "faults-s3", logs, storage_url="s3://faults/darkroom", max_retries=8) as f:
            f.start("w", faults="slow-unet:0.3", env=env)
            handle = f.submit(batch_id="s3-outage")
            progress = BatchProgress(base.broker_url)
            wait_for(lambda: progress.counts("s3-outage").done >= 2, timeout=300, what="two items done")
            server.stop()
            down_at = time.monotonic()
            time.sleep(30)
            marked_done = {i for i, s in progress.status_of("s3-outage").items() if s == "done"}
            server.restart()
            up_at = time.monotonic()
            # Nothing was marked done during the outage without its image having been written before it.
            for i in marked_done:
                assert s3.exists(keys.image_key("s3-outage", i)), f"item {i} done without its image"
            summary = handle.wait(timeout=400)
            recovery = time.monotonic() - up_at
            retries = f.logs_text().count("retrying")
        assert summary.state == "completed"
        assert retries >= 1, "no transient storage error was met: the outage missed the batch"
        check_batch(s3, "s3-outage", reference)
    finally:
        server.stop()
    print(f"\nscenario 5: S3 down {up_at - down_at:.0f} s mid-batch; {retries} transient errors retried with "
          f"backoff; batch completed {recovery:.1f} s after S3 came back")
