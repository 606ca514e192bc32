"""Steering batches: cancel and pause/resume, against a real Redis, real `darkroom worker` processes and real
OpenVINO on the tiny model. The UNet loop is slowed by the test-only fault hook (workers/runtime/faults.py), whose
log says which item ran which denoising step in which process: what rendered, and when it stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from broker.settings import Settings
from broker.steering import BatchSteering
from darkroom import submit
from darkroom.steering import cancel, pause, resume
from storage import keys, open_storage
from testkit.fleet import REPO, convert_with_worker, run_cli
from tests.conftest import queue_settings_for, redis_db_url
from tests.faults import (
    PROMPTS,
    RENDER,
    SEED,
    Farm,
    Step,
    farm,
    kill_group,
    mid_unet,
    overlapping_runs,
    pool_children,
    unet_steps,
    wait_for,
)

SLOW = "slow-unet:0.3"


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("steer"), redis_db_url(redis_server, 8))


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("steer-logs")


@pytest.fixture(scope="module")
def model(settings: Settings, logs: Path, tiny_sd_dir: Path) -> str:
    return convert_with_worker(settings, tiny_sd_dir, "tiny", logs / "convert.log")


@pytest.fixture(scope="module")
def slow_farm(settings: Settings, logs: Path, model: str) -> Iterator[Farm]:
    """One warm worker on queue `steer` whose every UNet step takes 0.3 s more."""
    with farm(settings, "steer", logs) as f:
        f.start("w", faults=SLOW)
        yield f


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(settings.broker_url)
    yield c
    c.close()


def _pngs(settings: Settings, batch_id: str) -> list[str]:
    return [k for k in open_storage(settings.storage_url).list_keys(f"images/{batch_id}/") if k.endswith(".png")]


def _steps_of(f: Farm, batch_id: str) -> dict[int, list[int]]:
    """Per item index of `batch_id`, the UNet steps its render(s) reached, in order."""
    out: dict[int, list[int]] = {}
    for s in unet_steps(f.fault_log):
        if s.item.startswith(batch_id + "."):
            out.setdefault(int(s.item.rsplit(".", 1)[1]), []).append(s.step)
    return out


def test_cancel_with_no_worker_finishes_the_batch_and_a_worker_later_renders_nothing(
        settings: Settings, logs: Path, model: str, client: redis.Redis) -> None:
    held = "steer-held"
    handle = submit(PROMPTS[:5], model=model, seed=SEED, queue=held, batch_id="cancel-held", settings=settings,
                    **RENDER)
    assert client.llen(held) == 5
    result = cancel(handle.batch_id, settings=settings)
    assert (result.state, result.items) == ("cancelled", 5)
    summary = handle.wait(timeout=30)
    assert (summary.state, summary.done, summary.failed, summary.cancelled) == ("cancelled", 0, 0, 5)
    manifest = open_storage(settings.storage_url).get_json(keys.batch_manifest_key(handle.batch_id))
    assert manifest["state"] == "cancelled" and manifest["cancelled"] == 5
    assert sorted(i["index"] for i in manifest["items"]) == list(range(5))
    assert {i["status"] for i in manifest["items"]} == {"cancelled"}
    # Cancelling again changes nothing and says so.
    assert cancel(handle.batch_id, settings=settings).note == "already cancelled"
    again = run_cli("cancel", handle.batch_id, settings=settings)
    assert again.returncode == 0 and "already cancelled" in again.stdout, again.stderr
    # A worker that then receives the queued items records them without loading the model or rendering.
    with farm(settings, held, logs) as f:
        f.start("drain")
        wait_for(lambda: client.llen(held) == 0, timeout=120, what="the cancelled items to be drained")
        time.sleep(1.0)
        assert _steps_of(f, handle.batch_id) == {}
    assert _pngs(settings, handle.batch_id) == []
    assert handle.summary().cancelled == 5


def test_cancel_stops_the_running_item_at_its_next_step_and_nothing_after_it_renders(
        settings: Settings, slow_farm: Farm, client: redis.Redis) -> None:
    handle = slow_farm.submit(PROMPTS[:4], batch_id="cancel-running", steps=20)
    running = mid_unet(slow_farm, handle.batch_id, min_step=3)
    index = _index(running)
    cancelled_at = time.monotonic()
    cancel(handle.batch_id, settings=settings)
    summary = handle.wait(timeout=60)
    waited = time.monotonic() - cancelled_at
    assert summary.state == "cancelled" and summary.done == 0 and summary.cancelled == 4, summary
    steps = _steps_of(slow_farm, handle.batch_id)
    # The running item stopped within a step or two of the cancel (a step in flight, then the check), far
    # from its 20 steps; no other item of the batch ever reached the UNet.
    assert set(steps) == {index}, steps
    assert max(steps[index]) <= running.step + 3, (running, steps)
    assert waited < 20, waited
    assert _pngs(settings, handle.batch_id) == []
    item = next(i for i in summary.items if i.index == index)
    assert item.status == "cancelled" and item.worker and "producer" not in item.worker
    assert not open_storage(settings.storage_url).exists(keys.item_record_key(handle.batch_id, index))
    wait_for(lambda: client.llen("steer") == 0, timeout=60, what="the worker to go idle")


def test_a_paused_batch_parks_its_items_lets_another_batch_through_and_resume_renders_the_rest(
        settings: Settings, slow_farm: Farm) -> None:
    paused = slow_farm.submit(PROMPTS[:4], batch_id="paused-a")
    first = mid_unet(slow_farm, paused.batch_id, min_step=1)
    assert pause(paused.batch_id, settings=settings).state == "paused"
    assert pause(paused.batch_id, settings=settings).note == "already paused"
    other = slow_farm.submit(PROMPTS[4:6], batch_id="runs-b")
    # No head-of-line blocking: the other batch completes while the first is paused.
    assert other.wait(timeout=120).state == "completed"
    progress = paused.progress
    steering = BatchSteering(progress.client)
    parked = wait_for(lambda: steering.parked(paused.batch_id) if len(steering.parked(paused.batch_id)) == 3
                      else None, timeout=60, what="three parked items")
    summary = paused.summary()
    assert summary.state == "paused" and summary.done == 1, summary
    started = _steps_of(slow_farm, paused.batch_id)
    assert set(started) == {_index(first)}, started  # only the running item rendered
    assert sorted(parked) == sorted(set(range(4)) - set(started))
    # Resume: exactly the parked items are sent again and render once each.
    result = resume(paused.batch_id, settings=settings)
    assert (result.state, result.items) == ("running", 3)
    done = paused.wait(timeout=180)
    assert (done.state, done.done) == ("completed", 4), done
    steps = _steps_of(slow_farm, paused.batch_id)
    assert sorted(steps) == [0, 1, 2, 3] and all(s.count(1) == 1 for s in steps.values()), steps
    assert overlapping_runs(unet_steps(slow_farm.fault_log)) == []
    assert len(_pngs(settings, paused.batch_id)) == 4
    manifest = open_storage(settings.storage_url).get_json(keys.batch_manifest_key(paused.batch_id))
    assert sorted(i["index"] for i in manifest["items"]) == [0, 1, 2, 3]


def test_submit_wait_exits_4_when_its_batch_is_cancelled(settings: Settings, model: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), **settings.as_env()}
    waiting = subprocess.Popen(
        [sys.executable, "-m", "darkroom", "submit", str(prompts), "--model", model, "--queue", "steer-nobody",
         "--batch-id", "cancel-cli", "--steps", "2", "--width", "64", "--height", "64", "--wait"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        progress = BatchSteering(redis.Redis.from_url(settings.broker_url))
        wait_for(lambda: progress.client.exists("darkroom:batch:cancel-cli:meta"), timeout=60,
                 what="the batch to be submitted")
        cancelled = run_cli("cancel", "cancel-cli", settings=settings)
        assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 4, (out, err)
    assert "cancelled" in out


def test_steering_bad_input_is_one_line_exit_2_and_changes_nothing(settings: Settings, model: str) -> None:
    handle = submit(["a cat"], model=model, queue="steer-nobody-2", batch_id="steer-bad", settings=settings,
                    steps=2, width=64, height=64)
    cases = [(("cancel", "no-such-batch"), "unknown batch 'no-such-batch'"),
             (("pause", "../etc"), "invalid batch name"),
             (("resume", handle.batch_id), "is not paused (it is queued)")]
    for args, message in cases:
        out = run_cli(*args, settings=settings)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert BatchSteering(handle.progress.client).mark(handle.batch_id) is None
    cancel(handle.batch_id, settings=settings)
    for args, message in ((("pause", handle.batch_id), "already cancelled"),
                          (("resume", handle.batch_id), "is not paused (it is cancelled)")):
        out = run_cli(*args, settings=settings)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


# --- The fault suite's steering scenarios: nothing lost, nothing rendered twice into the manifest. ----------------

def test_fault_a_worker_sigkilled_while_its_item_is_being_cancelled(settings: Settings, logs: Path,
                                                                    model: str) -> None:
    with farm(settings, "steer-kill", logs, visibility_timeout=15) as f:
        doomed = f.start("doomed", faults=SLOW)
        f.start("survivor", faults=SLOW)
        handle = f.submit(PROMPTS, batch_id="cancel-killed", steps=20)
        running = mid_unet(f, handle.batch_id, pids=pool_children(doomed), min_step=2)
        cancel(handle.batch_id, settings=settings)
        kill_group(doomed)  # mid-step: its item neither finished nor recorded cancelled by itself
        # Its message comes back after the visibility timeout; the survivor then records it cancelled.
        summary = handle.wait(timeout=240)
    assert summary.state == "cancelled", summary
    manifest = open_storage(settings.storage_url).get_json(keys.batch_manifest_key(handle.batch_id))
    entries = sorted(i["index"] for i in manifest["items"])
    assert entries == list(range(len(PROMPTS))), entries
    statuses = {i["index"]: i["status"] for i in manifest["items"]}
    assert set(statuses.values()) <= {"cancelled", "done"} and statuses[_index(running)] == "cancelled"
    assert sorted(_pngs(settings, handle.batch_id)) == sorted(
        keys.image_key(handle.batch_id, i) for i, s in statuses.items() if s == "done")
    # The killed item never rendered again elsewhere.
    again = [s for s in unet_steps(f.fault_log) if s.item == running.item and s.pid != running.pid]
    assert again == [], again


def test_fault_redis_restarted_while_a_batch_is_paused(settings: Settings, logs: Path, model: str,
                                                       tmp_path: Path) -> None:
    from broker.embedded import EmbeddedRedis

    server = EmbeddedRedis.start(password="steer-redis", appendonly=True, data_dir=tmp_path / "redis")
    local = replace(settings, broker_url=server.url)
    try:
        with farm(local, "steer-restart", logs) as f:
            f.start("w", faults=SLOW)
            handle = f.submit(PROMPTS[:6], batch_id="paused-restart")
            first = mid_unet(f, handle.batch_id, min_step=1)
            pause(handle.batch_id, settings=local)
            before = redis.Redis.from_url(local.broker_url)
            wait_for(lambda: len(BatchSteering(before).parked(handle.batch_id)) == 5, timeout=120,
                     what="five parked items")
            before.close()
            server.restart()  # SIGTERM (AOF flushed), then the same port and data dir
            after = redis.Redis.from_url(local.broker_url)
            assert BatchSteering(after).mark(handle.batch_id) == "paused"
            assert len(BatchSteering(after).parked(handle.batch_id)) == 5
            after.close()
            assert handle.summary().state == "paused"
            assert resume(handle.batch_id, settings=local).items == 5
            done = handle.wait(timeout=300)
    finally:
        server.stop()
    assert (done.state, done.done) == ("completed", 6), done
    steps = _steps_of(f, handle.batch_id)
    assert sorted(steps) == list(range(6)) and all(s.count(1) == 1 for s in steps.values()), steps
    assert steps[_index(first)][0] == 1
    assert len(_pngs(settings, handle.batch_id)) == 6


def _index(step: Step) -> int:
    return int(step.item.rsplit(".", 1)[1])


def test_a_high_priority_batch_goes_ahead_of_a_low_one_as_soon_as_the_running_image_ends(
        settings: Settings, slow_farm: Farm) -> None:
    low = slow_farm.submit([f"a low lighthouse {i}" for i in range(10)], batch_id="prio-low", priority="low")
    running = mid_unet(slow_farm, low.batch_id, min_step=1)
    submitted = time.time()
    high = slow_farm.submit(PROMPTS[:2], batch_id="prio-high", priority="high")
    assert high.wait(timeout=120).state == "completed"
    # The image running when the high batch arrived finished; the next two images the worker started were the
    # high ones, then the low batch went on.
    starts = [s for s in unet_steps(slow_farm.fault_log) if s.step == 1 and s.at > submitted]
    order = [s.item.split(".")[0] for s in starts]
    assert order[:2] == ["prio-high", "prio-high"], order
    assert running.item not in [s.item for s in starts]
    cancel(low.batch_id, settings=settings)
    assert low.wait(timeout=60).state == "cancelled"


def test_reprioritizing_moves_the_waiting_items_and_renders_each_once(settings: Settings, slow_farm: Farm) -> None:
    blocker = slow_farm.submit([f"a blocking lighthouse {i}" for i in range(6)], batch_id="prio-blocker")
    mid_unet(slow_farm, blocker.batch_id, min_step=1)
    late = slow_farm.submit(PROMPTS[:3], batch_id="prio-late", priority="low")
    moved = run_cli("priority", late.batch_id, "high", settings=settings)
    assert moved.returncode == 0 and "3 waiting item(s) moved to priority high" in moved.stdout, moved.stderr
    assert late.wait(timeout=120).done == 3
    assert blocker.wait(timeout=180).done == 6
    order = [s.item.split(".")[0] for s in unet_steps(slow_farm.fault_log) if s.step == 1
             and s.item.split(".")[0] in ("prio-late", "prio-blocker")]
    # Moved to high, the low batch went ahead of the blocker's waiting (normal) items.
    last_late = max(i for i, batch in enumerate(order) if batch == "prio-late")
    assert last_late < max(i for i, batch in enumerate(order) if batch == "prio-blocker"), order
    assert order.count("prio-late") == 3, order
    later = [s.item for s in unet_steps(slow_farm.fault_log) if s.step == 1 and s.item.startswith("prio-late.")]
    assert sorted(later) == ["prio-late.0", "prio-late.1", "prio-late.2"]
    bad = run_cli("priority", late.batch_id, "urgent", settings=settings)
    assert bad.returncode == 2 and "invalid choice: 'urgent'" in bad.stderr
