"""Retrying failed and dead-lettered items, and resubmitting a batch after a failure, on real parts.

Two real workers share the module: a healthy one, and a faulty one whose test-only faults
(workers/runtime/faults.py) kill every pool process that renders a POISON prompt (so the item is
dead-lettered) and refuse BROKEN prompts as invalid (failed at once). A scenario serves its own queue
with the faulty worker, then "fixes the cause" by moving that queue to the healthy worker (Celery's
remote control), and retries. Every batch of PROMPTS uses the same seed, so item i must end
byte-identical to an undisturbed render.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from broker.app import make_app
from broker.progress import BatchProgress, batch_key, dead_letter_key
from broker.reopen import reopen_failed, restore_failed
from broker.settings import Settings
from darkroom import BatchHandle, dead_letters, retry, submit, submit_convert
from storage import keys, open_storage
from tasks.errors import InvalidRequest
from tasks.schemas import ItemResult
from testkit.fleet import WorkerProcess, run_cli
from tests.conftest import queue_settings_for, redis_db_url

PROMPTS = ["a red cube on a table", "POISON a blue sphere", "BROKEN a green cone", "a grey cat"]
SEED = 4321
RENDER = {"steps": 3, "width": 64, "height": 64}
FAULTS = "crash-on-prompt:POISON,invalid-on-prompt:BROKEN"


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("retry"), redis_db_url(redis_server, 8))


@pytest.fixture(scope="module")
def workers(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, WorkerProcess]]:
    logs = tmp_path_factory.mktemp("retry-logs")
    healthy = WorkerProcess(settings, ["convert", "retry-healthy"], logs / "healthy.log")
    faulty = WorkerProcess(settings, ["retry-faulty"], logs / "faulty.log",
                           extra_env={"DARKROOM_FAULT_INJECT": FAULTS})
    try:
        yield {"healthy": healthy.start(), "faulty": faulty.start()}
    finally:
        healthy.stop()
        faulty.stop(timeout=60)


@pytest.fixture(scope="module")
def reference(workers: dict[str, WorkerProcess], tiny_sd_dir: Path, settings: Settings) -> dict[int, bytes]:
    """Convert the tiny model, then render the prompts once on the healthy worker: the bytes to match."""
    outcome = submit_convert(str(tiny_sd_dir), name="tiny", weight_format="fp32", settings=settings).get(timeout=600)
    assert outcome["status"] == "done", outcome
    handle = _submit(settings, "retry-healthy", "reference")
    assert handle.wait(timeout=300).done == len(PROMPTS)
    storage = open_storage(settings.storage_url)
    images = {i: storage.get_bytes(keys.image_key("reference", i)) for i in range(len(PROMPTS))}
    assert len(set(images.values())) == len(PROMPTS)
    return images


def _submit(settings: Settings, queue: str, batch_id: str, prompts: list[str] | None = None) -> BatchHandle:
    return submit(prompts or PROMPTS, model="tiny", seed=SEED, queue=queue, batch_id=batch_id, settings=settings,
                  **RENDER)


def _consume(settings: Settings, worker: WorkerProcess, queue: str, *, on: bool = True) -> None:
    """Start (or stop) `worker` consuming `queue`, by Celery's remote control: how an operator moves a queue."""
    app = make_app(settings)
    try:
        control = app.control.add_consumer if on else app.control.cancel_consumer
        replies = control(queue, destination=[worker.nodename], reply=True, timeout=10)
        assert replies, f"{worker.nodename} did not answer"
    finally:
        app.close()
    if not on:
        # A BRPOP the worker issued before the cancel still covers the queue for up to kombu's 1 s brpop_timeout
        # (a message it takes then is requeued): let it end, so what the test sends next stays in the queue.
        time.sleep(2.5)


def _manifest(settings: Settings, batch_id: str) -> dict:
    return open_storage(settings.storage_url).get_json(keys.batch_manifest_key(batch_id))


def _check_images(settings: Settings, batch_id: str, reference: dict[int, bytes], done: set[int]) -> None:
    storage = open_storage(settings.storage_url)
    for i in done:
        assert storage.get_bytes(keys.image_key(batch_id, i)) == reference[i], f"item {i} differs from reference"


def test_resubmitting_a_batch_after_a_failure_waits_for_the_new_attempts(
        settings: Settings, workers: dict[str, WorkerProcess], reference: dict[int, bytes]) -> None:
    queue = "retry-resubmit"
    _consume(settings, workers["faulty"], queue)
    first = _submit(settings, queue, "resubmitted").wait(timeout=400)
    assert (first.state, first.done, first.failed) == ("completed_with_failures", 2, 2)
    assert [i.index for i in first.items if i.status == "failed"] == [1, 2]
    assert _manifest(settings, "resubmitted")["failed"] == 2
    # The cause is fixed: the queue moves to the healthy worker. The same batch id again re-sends items 1 and 2.
    _consume(settings, workers["faulty"], queue, on=False)
    _consume(settings, workers["healthy"], queue)
    again = _submit(settings, queue, "resubmitted")
    assert again.enqueued == 2
    summary = again.wait(timeout=300)
    # wait() waited for the new attempt: its outcome, not the old failure.
    assert (summary.state, summary.done, summary.failed) == ("completed", 4, 0), summary
    manifest = _manifest(settings, "resubmitted")
    assert (manifest["state"], manifest["done"], manifest["failed"]) == ("completed", 4, 0)
    assert sorted(i["index"] for i in manifest["items"]) == [0, 1, 2, 3]
    _check_images(settings, "resubmitted", reference, {0, 1, 2, 3})
    # The dead letter of item 1 went with the failure it recorded.
    assert dead_letters("resubmitted", settings=settings) == []


def test_retry_sends_failed_then_dead_items_again_and_they_match_a_first_render(
        settings: Settings, workers: dict[str, WorkerProcess], reference: dict[int, bytes]) -> None:
    queue, batch = "retry-cli", "retried"
    _consume(settings, workers["faulty"], queue)
    first = _submit(settings, queue, batch).wait(timeout=400)
    assert (first.state, first.done, first.failed) == ("completed_with_failures", 2, 2)
    errors = {i.index: i.error or "" for i in first.items if i.status == "failed"}
    assert errors[1].startswith("dead letter after 3 attempts: WorkerLostError")
    assert errors[2].startswith("invalid request: prompt: injected fault")
    # Item 1 is a dead letter (its worker died on every attempt); item 2 only failed.
    letters = dead_letters(batch, settings=settings)
    assert [(d.batch_id, d.index, d.attempts, d.prompt) for d in letters] == [(batch, 1, 3, PROMPTS[1])]
    assert "WorkerLostError" in letters[0].error
    listed = run_cli("dead-letters", "--json", settings=settings)
    assert listed.returncode == 0, listed.stderr
    assert [(d["batch_id"], d["index"]) for d in json.loads(listed.stdout)] == [(batch, 1)]
    _consume(settings, workers["faulty"], queue, on=False)
    # --failed: item 2 only. No worker serves the queue yet, so its new attempt stays queued.
    done = run_cli("retry", batch, "--failed", settings=settings)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"batch {batch}: 1 item(s) queued again (2)"
    progress = BatchProgress(settings.broker_url)
    assert progress.counts(batch).state == "running" and 2 not in progress.status_of(batch)
    # A second retry meanwhile is refused and changes nothing: one message queued, the dead letter still listed.
    again = run_cli("retry", batch, settings=settings)
    assert again.returncode == 2
    assert again.stderr.strip() == (f"darkroom: error: batch: batch {batch!r} is still running: 1 of 4 item(s) "
                                    "neither done nor failed; retry it once they have ended")
    assert progress.client.llen(queue) == 1
    assert [d.index for d in dead_letters(batch, settings=settings)] == [1]
    # The cause is fixed: the healthy worker takes the queue; the batch ends again and its manifest is rewritten.
    _consume(settings, workers["healthy"], queue)
    middle = BatchHandle(batch, 4, settings).wait(timeout=300)
    assert (middle.done, middle.failed) == (3, 1)
    manifest = _manifest(settings, batch)
    assert [(i["index"], i["status"]) for i in manifest["items"]] == [(0, "done"), (1, "failed"), (2, "done"),
                                                                        (3, "done")]
    # --dead --wait: item 1 again, followed to the end; exit 0 since nothing failed.
    done = run_cli("retry", batch, "--dead", "--wait", "--json", settings=settings)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["state"], report["done"], report["failed"]) == ("completed", 4, 0)
    assert dead_letters(batch, settings=settings) == []
    manifest = _manifest(settings, batch)
    assert (manifest["state"], manifest["done"], manifest["failed"]) == ("completed", 4, 0)
    assert [i["index"] for i in manifest["items"]] == [0, 1, 2, 3]
    assert {i["index"]: i["attempts"] for i in manifest["items"]}[1] == 1  # a new attempt, not the 4th
    storage = open_storage(settings.storage_url)
    assert sorted(k for k in storage.list_keys(f"images/{batch}/") if k.endswith(".png")) == [
        keys.image_key(batch, i) for i in range(4)]
    _check_images(settings, batch, reference, {0, 1, 2, 3})
    # Nothing left to retry: exit 0, nothing sent.
    nothing = run_cli("retry", batch, settings=settings)
    assert nothing.returncode == 0 and nothing.stdout.strip() == f"batch {batch}: nothing to retry"


def test_two_retries_at_once_send_each_item_once(settings: Settings, workers: dict[str, WorkerProcess],
                                                 reference: dict[int, bytes]) -> None:
    queue, batch = "retry-race", "raced"
    prompts = ["BROKEN one", "a grey cat", "BROKEN two"]
    _consume(settings, workers["faulty"], queue)
    first = _submit(settings, queue, batch, prompts).wait(timeout=300)
    assert (first.done, first.failed) == (1, 2)
    # Retried with the cause not fixed: --wait follows the new attempts, which fail again: exit 1, both listed.
    progress = BatchProgress(settings.broker_url)
    epoch = progress.counts(batch).epoch
    still = run_cli("retry", batch, "--wait", settings=settings)
    assert still.returncode == 1, still.stderr
    assert f"batch {batch}: completed_with_failures, 1 done, 2 failed of 3" in still.stdout
    assert "item 0 ('BROKEN one'): invalid request: prompt: injected fault" in still.stdout
    counts = progress.counts(batch)
    assert (counts.failed, counts.epoch, counts.in_manifest) == (2, epoch + 1, 3)  # new outcomes, manifest rewritten
    _consume(settings, workers["faulty"], queue, on=False)

    def attempt() -> BatchHandle | InvalidRequest:
        try:
            return retry(batch, settings=settings)
        except InvalidRequest as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: attempt(), range(2)))
    handles = [o for o in outcomes if isinstance(o, BatchHandle)]
    refused = [o for o in outcomes if isinstance(o, InvalidRequest)]
    assert len(handles) == 1 and len(refused) == 1, outcomes
    assert handles[0].retried == (0, 2) and "still running: 2 of 3" in str(refused[0])
    assert progress.client.llen(queue) == 2
    _consume(settings, workers["healthy"], queue)
    summary = handles[0].wait(timeout=300)
    assert (summary.state, summary.done, summary.failed) == ("completed", 3, 0)
    manifest = _manifest(settings, batch)
    assert [(i["index"], i["status"]) for i in manifest["items"]] == [(0, "done"), (1, "done"), (2, "done")]


@pytest.mark.parametrize(("args", "message"), [
    (["retry", "no-such-batch"], "darkroom: error: batch: unknown batch 'no-such-batch'"),
    (["retry", "../etc"], "darkroom: error: batch: invalid batch name '../etc'"),
    (["dead-letters", "no-such-batch"], "darkroom: error: batch: unknown batch 'no-such-batch'"),
])
def test_retrying_what_does_not_exist_is_one_clear_line(settings: Settings, args: list[str], message: str) -> None:
    done = run_cli(*args, settings=settings, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message) and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not BatchProgress(settings.broker_url).exists("no-such-batch")


def test_a_manifest_written_before_a_reopening_does_not_count_for_the_new_attempts(settings: Settings) -> None:
    progress = BatchProgress(settings.broker_url)
    batch = "epochs"
    progress.start(batch, 2, {})
    progress.record(ItemResult(batch_id=batch, index=0, status="done"))
    progress.record(ItemResult(batch_id=batch, index=1, status="failed", error="boom"))
    # Item 1 a dead letter; item 0 a stale one (another delivery finished it), dropped by the reopening.
    progress.client.hset(dead_letter_key(batch), mapping={"1": json.dumps({"error": "boom"}), "0": "{}"})
    progress.client.expire(batch_key(batch, "meta"), 100)  # nearly expired: the new attempts get a full ttl
    before = progress.counts(batch)
    progress.mark_manifest(batch, 2, before.epoch)
    reopened = reopen_failed(progress, batch)
    assert reopened.indices == [1] and reopened.in_manifest == 2
    after = progress.counts(batch)
    assert (after.done, after.failed, after.in_manifest, after.epoch) == (1, 0, 0, before.epoch + 1)
    assert progress.status_of(batch) == {0: "done"} and not progress.client.exists(dead_letter_key(batch))
    assert progress.client.ttl(batch_key(batch, "meta")) > progress.ttl - 60
    # A worker that read the old counts marks its (old) manifest: it must not end the new wait.
    progress.mark_manifest(batch, 2, before.epoch)
    assert progress.counts(batch).in_manifest == 0
    # Sending failed: the old outcome is put back, dead letter included.
    assert restore_failed(progress, reopened) == 1
    restored = progress.counts(batch)
    assert (restored.failed, restored.in_manifest) == (1, 2) and progress.dead_letters(batch)[1]["error"] == "boom"
    # Nothing to reopen for --failed alone (item 1 is a dead letter), and a running batch is refused.
    assert reopen_failed(progress, batch, dead=False).indices == []
    progress.start("running", 2, {})
    progress.record(ItemResult(batch_id="running", index=0, status="failed"))
    assert reopen_failed(progress, "running").state == "running"
    assert progress.status_of("running") == {0: "failed"}
