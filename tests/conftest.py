"""Session fixtures: tiny random-weight models built from configs, and real Redis and S3 servers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from broker.settings import Settings

if TYPE_CHECKING:
    from storage.s3 import S3Storage

S3_ACCESS_KEY = "darkroom-test"
S3_SECRET_KEY = "darkroom-test-secret-key"
REDIS_PASSWORD = "darkroom-test-redis-password"


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testkit.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0, variant="sd")


@pytest.fixture(scope="session")
def tiny_bksdm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testkit.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-bksdm") / "model", seed=0, variant="bk-sdm")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Redis on a free port, with a password, for the whole session."""
    from broker.embedded import EmbeddedRedis

    server = EmbeddedRedis.start(password=REDIS_PASSWORD, data_dir=tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 server (SeaweedFS) that enforces its access keys."""
    from testkit.services import SeaweedS3

    server = SeaweedS3.start(tmp_path_factory.mktemp("seaweed"), access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY)
    yield server
    server.stop()


def s3_env(endpoint: str, *, secret: str = S3_SECRET_KEY) -> dict[str, str]:
    return {"DARKROOM_S3_ENDPOINT": endpoint, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def exported_env(values: dict[str, str]) -> Iterator[dict[str, str]]:
    """`values` set in this process's environment while inside (S3 keys: the producer here reads S3 too)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in values.items():
            mp.setenv(name, value)
        yield values


def s3_bucket(server: Any, bucket: str, prefix: str) -> S3Storage:
    """An S3Storage on the session's S3 server under s3://BUCKET/PREFIX, the bucket created."""
    from storage.s3 import S3Storage

    storage = S3Storage(bucket, prefix, endpoint_url=server.endpoint, access_key=S3_ACCESS_KEY,
                        secret_key=S3_SECRET_KEY)
    storage.ensure_bucket()
    return storage


def stored_tiny_artifact(tiny_sd_dir: Path, root: Path, name: str) -> tuple[Any, str, Path]:
    """The tiny model converted (fp32) and stored under `root/storage` as the conversion job leaves it:
    (storage, fingerprint, converted IR folder)."""
    from storage import keys, open_storage
    from workers.convert.sd import convert_sd

    storage = open_storage(str(root / "storage"))
    result = convert_sd(tiny_sd_dir, root / "ir", weight_format="fp32")
    prefix = keys.model_artifact_prefix(name, "fp32", result.fingerprint)
    storage.upload_dir(result.out_dir, prefix)
    storage.put_json(prefix + "manifest.json", {"name": name, "fingerprint": result.fingerprint})
    return storage, result.fingerprint, Path(result.out_dir)


def redis_db_url(server: Any, db: int) -> str:
    """The session's Redis, another database: each module's workers get queues of their own."""
    return server.url.rsplit("/", 1)[0] + f"/{db}"


def queue_settings_for(root: Path, broker_url: str, storage_url: str | None = None) -> Settings:
    # f32 inference so images are comparable with diffusers; the suite is about correctness, not speed.
    return Settings(broker_url=broker_url, storage_url=storage_url or str(root / "storage"),
                    cache_dir=root / "cache", inference_precision="f32", max_retries=2)
