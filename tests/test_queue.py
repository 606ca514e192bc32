"""The whole path on real parts: Redis, two real `darkroom worker` processes, storage, OpenVINO."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.progress import BatchProgress
from broker.settings import Settings
from darkroom import BatchHandle, submit, submit_convert
from darkroom.submit import send_jobs
from storage import keys, open_storage
from tasks.schemas import GenerateJob
from testkit.fleet import WorkerProcess, run_cli
from tests.conftest import queue_settings_for, redis_db_url
from workers.pipelines.png import read_png_metadata

FAST = {"steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("queue"), redis_db_url(redis_server, 1))


@pytest.fixture(scope="module")
def fleet(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[WorkerProcess, ...]]:
    logs = tmp_path_factory.mktemp("logs")
    # Both consume generate.CPU; lane-a and lane-b let a test send a request to one of them.
    a = WorkerProcess(settings, ["generate.CPU", "convert", "lane-a"], logs / "a.log")
    b = WorkerProcess(settings, ["generate.CPU", "lane-b"], logs / "b.log")
    try:
        yield a.start(), b.start()
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def model(fleet: object, tiny_sd_dir: Path, settings: Settings) -> str:
    outcome = submit_convert(str(tiny_sd_dir), name="tiny", weight_format="fp32", settings=settings).get(timeout=600)
    assert outcome["status"] == "done", outcome
    return "tiny"


def _manifest(settings: Settings, batch_id: str) -> dict:
    return open_storage(settings.storage_url).get_json(keys.batch_manifest_key(batch_id))


def test_conversion_writes_the_optimum_layout_and_is_idempotent(model: str, settings: Settings,
                                                                tiny_sd_dir: Path) -> None:
    storage = open_storage(settings.storage_url)
    default = storage.get_json(keys.model_default_key(model))
    prefix = keys.model_artifact_prefix(model, "fp32", default["fingerprint"])
    present = set(storage.list_keys(prefix))
    for name in ("model_index.json", "unet/openvino_model.xml", "unet/openvino_model.bin",
                 "text_encoder/openvino_model.xml", "vae_decoder/openvino_model.xml",
                 "vae_encoder/openvino_model.xml", "scheduler/scheduler_config.json", "manifest.json"):
        assert prefix + name in present, name
    manifest = storage.get_json(prefix + "manifest.json")
    assert manifest["defaults"] == {"width": 64, "height": 64, "scheduler": "pndm"}
    assert set(manifest["files"]) == {k.removeprefix(prefix) for k in present} - {"manifest.json"}
    # The same source again: same fingerprint, nothing rewritten.
    again = submit_convert(str(tiny_sd_dir), name=model, weight_format="fp32", settings=settings).get(timeout=300)
    assert again["fingerprint"] == default["fingerprint"]
    assert storage.get_json(prefix + "manifest.json")["created"] == manifest["created"]


def test_a_batch_is_split_across_two_workers_with_every_item_once(model: str, settings: Settings) -> None:
    prompts = [f"prompt number {i}" for i in range(20)]
    handle = submit(prompts, model=model, seed=7, settings=settings, **FAST)
    summary = handle.wait(timeout=600)
    assert (summary.state, summary.done, summary.failed) == ("completed", 20, 0)
    manifest = _manifest(settings, handle.batch_id)
    assert sorted(i["index"] for i in manifest["items"]) == list(range(20))
    workers = {i["worker"] for i in manifest["items"]}
    assert len(workers) == 2, f"one worker took everything: {workers}"
    storage = open_storage(settings.storage_url)
    for item in manifest["items"]:
        meta = read_png_metadata(storage.get_bytes(keys.image_key(handle.batch_id, item["index"])))
        assert meta["prompt"] == prompts[item["index"]] and int(meta["seed"]) == item["seed"]
        assert meta["model"] == model and meta["precision"] == "fp32" and meta["steps"] == "3"
        assert meta["scheduler"] == "pndm" and meta["width"] == "64" and meta["device"] == "CPU"
    assert len({i["seed"] for i in manifest["items"]}) == 20


def test_the_same_request_gives_identical_bytes_on_each_worker(model: str, settings: Settings) -> None:
    storage = open_storage(settings.storage_url)
    images = {}
    for lane in ("lane-a", "lane-b"):
        handle = submit(["a red cube", "a blue sphere"], model=model, seed=11, negative_prompt="blurry",
                        scheduler="euler-a", queue=lane, settings=settings, **FAST)
        summary = handle.wait(timeout=300)
        assert summary.done == 2
        images[lane] = [storage.get_bytes(keys.image_key(handle.batch_id, i)) for i in range(2)]
        workers = {i.worker for i in summary.items}
        images[lane + "-workers"] = workers
    assert images["lane-a-workers"].isdisjoint(images["lane-b-workers"])
    assert images["lane-a"] == images["lane-b"]
    assert images["lane-a"][0] != images["lane-a"][1]


def test_a_failing_item_is_reported_and_the_rest_of_the_batch_completes(model: str, settings: Settings) -> None:
    ok = submit(["one", "two", "three"], model=model, seed=1, settings=settings, batch_id="with-a-bad-item", **FAST)
    ok.wait(timeout=300)
    # A fourth item whose artifact does not exist (deleted, or never converted).
    progress = BatchProgress(settings.broker_url)
    progress.client.hset("darkroom:batch:with-a-bad-item:meta", "total", 4)
    bad = GenerateJob(batch_id="with-a-bad-item", index=3, prompt="four", seed=4, steps=3, guidance=7.5, width=64,
                      height=64, scheduler="pndm", model=model, precision="fp32", fingerprint="0" * 16)
    send_jobs([bad], settings, queue="generate.CPU")
    summary = BatchHandle("with-a-bad-item", 4, settings).wait(timeout=300)
    assert (summary.state, summary.done, summary.failed) == ("completed_with_failures", 3, 1)
    failed = [i for i in summary.items if i.status == "failed"]
    assert failed[0].index == 3 and "model" in failed[0].error and "no manifest" in failed[0].error
    manifest = _manifest(settings, "with-a-bad-item")
    assert manifest["failed"] == 1 and len(manifest["items"]) == 4


def test_resubmitting_a_batch_enqueues_only_what_is_unfinished(model: str, settings: Settings) -> None:
    first = submit(["x", "y"], model=model, seed=5, batch_id="twice", settings=settings, **FAST)
    assert first.enqueued == 2
    first.wait(timeout=300)
    second = submit(["x", "y"], model=model, seed=5, batch_id="twice", settings=settings, **FAST)
    assert second.enqueued == 0
    summary = second.wait(timeout=10)
    assert summary.done == 2 and len(summary.items) == 2


def test_the_cli_submits_waits_and_reports_json(model: str, settings: Settings, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat", "seed": 3}\n{"prompt": "a dog", "scheduler": "dpm++2m"}\n')
    done = run_cli("submit", str(prompts), "--model", model, "--steps", "3", "--images-per-prompt", "2",
                   "--seed", "9", "--wait", "--json", settings=settings)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["total"], report["done"], report["failed"]) == (4, 4, 0)
    assert [(i["index"], i["prompt"]) for i in report["items"]] == [(0, "a cat"), (1, "a cat"), (2, "a dog"),
                                                                     (3, "a dog")]
    assert [i["seed"] for i in report["items"][:2]] == [3, 4]
    assert all(i["status"] == "done" and i["uri"].endswith(".png") for i in report["items"])
    status = run_cli("status", report["batch_id"], "--json", settings=settings)
    assert json.loads(status.stdout)["state"] == "completed"
    out = tmp_path / "download"
    results = run_cli("results", report["batch_id"], "--download", str(out), settings=settings)
    assert results.returncode == 0, results.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    models = json.loads(run_cli("models", "--json", settings=settings).stdout)
    assert [m["name"] for m in models] == [model]


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--model", "nope"], 2, "model: unknown model 'nope' (known: tiny)"),
    (["--model", "tiny", "--width", "65"], 2, "width: 65 is not a multiple of 8"),
    (["--model", "tiny", "--steps", "100000"], 2, "steps: 100000 is more than 150"),
    (["--model", "tiny", "--scheduler", "warp"], 2, "scheduler: unknown scheduler 'warp'"),
    (["--model", "../etc"], 2, "model:"),
])
def test_bad_requests_fail_with_one_clear_line(model: str, settings: Settings, tmp_path: Path, args: list[str],
                                               code: int, message: str) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    done = run_cli("submit", str(prompts), *args, settings=settings)
    assert done.returncode == code, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("text", "message"), [
    ("", "prompts: no prompts in"),
    ('{"prompt": "ok"}\n{"prompt": 3, "steps": -1}\n', "line 2: prompt"),
    ('{"prompt": "ok"}\n{oops\n', "line 2: not valid JSON"),
])
def test_bad_prompt_files_fail_before_anything_is_enqueued(model: str, settings: Settings, tmp_path: Path,
                                                           text: str, message: str) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(text)
    done = run_cli("submit", str(prompts), "--model", model, "--batch-id", "never-sent", settings=settings)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not BatchProgress(settings.broker_url).exists("never-sent")


def test_an_unreachable_broker_is_one_clear_line(settings: Settings, tmp_path: Path) -> None:
    from testkit.services import free_port

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    dead = Settings(broker_url=f"redis://:secret@127.0.0.1:{free_port()}/0", storage_url=settings.storage_url)
    done = run_cli("submit", str(prompts), "--model", "tiny", settings=dead, timeout=60)
    assert done.returncode == 3, done.stderr
    assert "cannot reach the broker at redis://:***@127.0.0.1" in done.stderr
    assert "secret" not in done.stderr and "Traceback" not in done.stderr


def test_a_worker_for_a_device_that_does_not_exist_says_so(settings: Settings) -> None:
    done = run_cli("worker", "--device", "NPU.7", settings=settings, timeout=120)
    assert done.returncode == 2
    assert "device 'NPU.7' is not available here; OpenVINO sees: CPU" in done.stderr
    assert "Traceback" not in done.stderr
