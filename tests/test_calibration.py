"""The INT8 lifecycle through the real queue: calibrate, measure, gate, promote, roll back, schedule."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.settings import Settings
from darkroom import submit
from darkroom.calibration import calibrate_job, roll_back, submit_calibrate
from storage import keys, open_storage
from tasks.models import default_of
from testkit.fleet import REPO, WorkerProcess, convert_model, run_cli, running_worker
from tests.conftest import queue_settings_for, redis_db_url
from workers.pipelines.png import read_png_metadata

FAST = {"steps": 3, "width": 64, "height": 64}
OPEN_GATES = {"min_speedup": 0.0, "min_psnr_db": 0.0}
MODEL = "tiny"


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("calibration"), redis_db_url(redis_server, 3))


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    with running_worker(settings, ["generate.CPU", "convert", "calibrate"], tmp_path_factory) as w:
        yield w


@pytest.fixture(scope="module")
def model(worker: WorkerProcess, settings: Settings, tiny_sd_dir: Path) -> str:
    convert_model(settings, tiny_sd_dir, MODEL)
    return MODEL


def _calibrate(settings: Settings, **options: Any) -> dict[str, Any]:
    job = calibrate_job(MODEL, subset_size=options.pop("subset_size", 3), steps=options.pop("steps", 3), **options)
    return submit_calibrate(job, settings=settings).get(timeout=900)


def _render(settings: Settings, **options: Any) -> tuple[dict[str, str], str]:
    handle = submit(["a green triangle"], model=MODEL, seed=3, settings=settings, **FAST, **options)
    summary = handle.wait(timeout=300)
    assert summary.done == 1, summary
    storage = open_storage(settings.storage_url)
    return read_png_metadata(storage.get_bytes(keys.image_key(handle.batch_id, 0))), summary.items[0].worker or ""


@pytest.mark.parametrize("mode", ["int8", "weights-int8", "hybrid"])
def test_each_mode_calibrates_measures_and_generates(model: str, settings: Settings, mode: str) -> None:
    outcome = _calibrate(settings, mode=mode, promote=False, **OPEN_GATES)
    assert outcome["status"] == "done", outcome
    assert outcome["passed"] and not outcome["promoted"]
    storage = open_storage(settings.storage_url)
    report = storage.get_json(keys.model_report_key(MODEL, "int8", outcome["fingerprint"]))
    m = report["measurements"]
    assert report["mode"] == mode and report["base"]["precision"] == "fp32"
    assert 0 < m["int8_bytes"] and 0 < m["unet_int8_bytes"] < m["unet_fp_bytes"]
    assert set(m["unet_step_ms"]) == {"fp32", "default", "int8"} and all(v > 0 for v in m["unet_step_ms"].values())
    assert m["image_speedup"] == pytest.approx(m["image_s"]["default"] / m["image_s"]["int8"], rel=1e-2)
    assert m["max_pixel_diff"] > 0 and 0 < m["min_psnr_db"] <= m["psnr_db"] < 100
    assert report["dataset"]["prompts"] == 3 and len(report["versions"]["openvino"]) > 0
    # The artifact is servable: pin the precision and it renders with it.
    meta, _ = _render(settings, precision="int8")
    assert meta["precision"] == "int8"


def test_a_rejected_artifact_stays_a_candidate_with_its_reason(model: str, settings: Settings) -> None:
    before = default_of(open_storage(settings.storage_url), MODEL)
    outcome = _calibrate(settings, subset_size=2, min_speedup=0.0, min_psnr_db=200.0)
    assert outcome["status"] == "done" and not outcome["passed"] and not outcome["promoted"]
    assert "PSNR" in outcome["reason"] and "below 200.0 dB" in outcome["reason"]
    assert default_of(open_storage(settings.storage_url), MODEL)["fingerprint"] == before["fingerprint"]


def test_promotion_switches_a_running_worker_and_rollback_returns(model: str, settings: Settings) -> None:
    meta_before, worker_before = _render(settings)
    assert meta_before["precision"] == "fp32"
    outcome = _calibrate(settings, subset_size=4, **OPEN_GATES)
    assert outcome["promoted"], outcome
    meta_after, worker_after = _render(settings)
    assert worker_after == worker_before, "the same worker process, not restarted"
    assert (meta_after["precision"], meta_after["model_fingerprint"]) == ("int8", outcome["fingerprint"])
    roll_back(MODEL, settings=settings)
    meta_back, _ = _render(settings)
    assert meta_back["model_fingerprint"] == meta_before["model_fingerprint"]
    # A request can still pin a precision, whatever the default.
    meta_pinned, _ = _render(settings, precision="int8")
    assert meta_pinned["precision"] == "int8"


def test_an_unchanged_calibration_is_skipped_and_says_so(model: str, settings: Settings) -> None:
    first = _calibrate(settings, subset_size=5, promote=False, **OPEN_GATES)
    assert first["status"] == "done"
    again = _calibrate(settings, subset_size=5, promote=False, **OPEN_GATES)
    assert again["status"] == "skipped" and "unchanged" in again["reason"]
    assert again["fingerprint"] == first["fingerprint"]


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such"),
    ("", "empty"),
    ('{"prompt": "a cat"}\n{"prompt": \n', "JSON"),
])
def test_a_bad_dataset_fails_clearly_and_leaves_no_artifact(model: str, settings: Settings, tmp_path: Path,
                                                           content: str | None, message: str) -> None:
    path = tmp_path / "prompts.jsonl"
    if content is not None:
        path.write_text(content)
    storage = open_storage(settings.storage_url)
    before = set(storage.list_keys(f"models/{MODEL}/int8/"))
    outcome = _calibrate(settings, dataset=str(path), **OPEN_GATES)
    assert outcome["status"] == "failed" and "dataset" in outcome["error"]
    assert message.lower() in outcome["error"].lower(), outcome["error"]
    assert set(storage.list_keys(f"models/{MODEL}/int8/")) == before


def test_the_cli_reports_a_calibration_and_the_model(model: str, settings: Settings) -> None:
    done = run_cli("calibrate", MODEL, "--subset-size", "6", "--steps", "3", "--min-speedup", "0", "--min-psnr", "0",
                   "--no-promote", settings=settings, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "passed" in done.stdout
    shown = run_cli("models", MODEL, settings=settings)
    assert "drift vs float: PSNR" in shown.stdout and "UNet step:" in shown.stdout
    unknown = run_cli("calibrate", "nope", settings=settings)
    assert unknown.returncode == 2 and "unknown model 'nope'" in unknown.stderr


def test_a_schedule_fires_then_skips_when_nothing_changed(model: str, settings: Settings,
                                                          tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    added = run_cli("schedule", "add", MODEL, "--every", "3", "--subset-size", "7", "--steps", "3",
                    "--min-speedup", "0", "--min-psnr", "0", "--no-promote", settings=settings)
    assert added.returncode == 0, added.stderr
    listed = run_cli("schedule", "list", settings=settings)
    assert MODEL in listed.stdout and "every 3 s" in listed.stdout
    log = (tmp_path / "beat.log").open("wb")
    beat = subprocess.Popen([sys.executable, "-m", "darkroom", "beat"], cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **settings.as_env(), "PYTHONPATH": str(REPO)})
    storage = open_storage(settings.storage_url)
    try:
        deadline = time.monotonic() + 300
        statuses: list[str] = []
        while time.monotonic() < deadline:
            runs = [storage.get_json(k) for k in storage.list_keys(keys.calibration_runs_prefix(MODEL))]
            statuses = [r["status"] for r in runs if r["origin"] == "schedule"]
            if "done" in statuses and "skipped" in statuses[statuses.index("done"):]:
                break
            time.sleep(1)
        assert "done" in statuses and "skipped" in statuses[statuses.index("done"):], statuses
        removed = run_cli("schedule", "remove", MODEL, settings=settings)
        assert removed.returncode == 0, removed.stderr
        time.sleep(4)  # a beat tick in flight must not bring it back
        assert MODEL not in run_cli("schedule", "list", settings=settings).stdout
        gone = run_cli("schedule", "remove", MODEL, settings=settings)
        assert gone.returncode == 2 and "no schedule for model 'tiny'" in gone.stderr
    finally:
        run_cli("schedule", "remove", MODEL, settings=settings)
        beat.send_signal(signal.SIGTERM)
        beat.wait(timeout=30)


def test_a_calibration_already_running_is_not_run_beside_it_but_after_it(model: str, settings: Settings) -> None:
    import redis

    from broker.locks import HeartbeatLock

    client = redis.Redis.from_url(settings.broker_url)
    storage = open_storage(settings.storage_url)
    runs_before = set(storage.list_keys(keys.calibration_runs_prefix(MODEL)))
    job = calibrate_job(MODEL, subset_size=8, steps=3, **OPEN_GATES)
    with HeartbeatLock(client, f"darkroom:calibrating:{MODEL}", ttl=60) as lock:
        assert lock.acquire()
        pending = submit_calibrate(job, settings=settings)
        time.sleep(8)
        # Deferred, not run and not dropped: no result yet, no run recorded.
        assert not pending.ready()
        assert set(storage.list_keys(keys.calibration_runs_prefix(MODEL))) == runs_before
    outcome = pending.get(timeout=900)  # sent again for later under the same task id; runs once the lock is free
    assert outcome["status"] in ("done", "skipped"), outcome
    assert len(set(storage.list_keys(keys.calibration_runs_prefix(MODEL))) - runs_before) == 1


def test_calibration_refuses_to_start_without_enough_memory(model: str, settings: Settings,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # In this process (the job code runs on its own, without Celery): a corner, not the user's path.
    from workers.calibrate.job import run_calibrate
    from workers.runtime.context import WorkerRuntime

    monkeypatch.setenv("DARKROOM_CALIBRATION_MEMORY_FACTOR", "1000000")
    storage = open_storage(settings.storage_url)
    before = set(storage.list_keys(f"models/{MODEL}/int8/"))
    job = calibrate_job(MODEL, subset_size=9, steps=3, **OPEN_GATES)
    outcome = run_calibrate(job.model_dump(), WorkerRuntime(settings, "CPU"))
    assert outcome["status"] == "failed"
    assert "needs about" in outcome["error"] and "GiB is available" in outcome["error"]
    assert set(storage.list_keys(f"models/{MODEL}/int8/")) == before
