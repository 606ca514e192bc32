"""The same path with S3 storage: a real SeaweedFS server with enforced keys, real workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.settings import Settings
from darkroom import submit
from storage import keys
from storage.s3 import S3Storage
from testkit.fleet import WorkerProcess, convert_model, run_cli, running_worker
from tests.conftest import exported_env, queue_settings_for, redis_db_url, s3_bucket, s3_env
from workers.pipelines.png import read_png_metadata

BUCKET = "farm"


@pytest.fixture(scope="module")
def s3(s3_server: object) -> S3Storage:
    return s3_bucket(s3_server, BUCKET, "darkroom")


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory, s3: S3Storage) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("s3queue"), redis_db_url(redis_server, 2),
                              storage_url=f"s3://{BUCKET}/darkroom")


@pytest.fixture(scope="module")
def worker(settings: Settings, s3_server: object, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[WorkerProcess]:
    with exported_env(s3_env(s3_server.endpoint)) as env:  # the producer in this process reads S3 too
        with running_worker(settings, ["generate.CPU", "convert"], tmp_path_factory, extra_env=env) as process:
            yield process


def test_convert_and_generate_through_s3(worker: WorkerProcess, settings: Settings, s3: S3Storage,
                                         tiny_sd_dir: Path) -> None:
    outcome = convert_model(settings, tiny_sd_dir, "tiny-s3", weight_format="fp16")
    assert outcome["uri"].startswith(f"s3://{BUCKET}/darkroom/models/tiny-s3/fp16/")
    handle = submit([f"s3 prompt {i}" for i in range(6)], model="tiny-s3", steps=3, seed=21, settings=settings)
    summary = handle.wait(timeout=600)
    assert (summary.done, summary.failed) == (6, 0)
    stored = set(s3.list_keys(f"images/{handle.batch_id}/"))
    for i in range(6):
        assert keys.image_key(handle.batch_id, i) in stored
        assert keys.item_record_key(handle.batch_id, i) in stored
        meta = read_png_metadata(s3.get_bytes(keys.image_key(handle.batch_id, i)))
        assert meta["precision"] == "fp16" and meta["prompt"] == f"s3 prompt {i}"
    assert keys.batch_manifest_key(handle.batch_id) in stored
    assert summary.items[0].uri.startswith(f"s3://{BUCKET}/darkroom/images/")


def test_a_wrong_s3_secret_is_one_clear_line(worker: WorkerProcess, settings: Settings, s3_server: object) -> None:
    done = run_cli("models", settings=settings, env=s3_env(s3_server.endpoint, secret="not-the-secret"))
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "not-the-secret" not in done.stderr
    assert "denied" in done.stderr.lower() or "credentials" in done.stderr.lower()


def test_an_unreachable_s3_endpoint_is_one_clear_line(settings: Settings, tmp_path: Path) -> None:
    from testkit.services import free_port

    done = run_cli("models", settings=settings, env=s3_env(f"http://127.0.0.1:{free_port()}"), timeout=120)
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
