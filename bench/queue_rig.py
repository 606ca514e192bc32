"""The real queue for the worker benchmarks (imported by bench/throughput.py and bench/cold_start.py, not run).

An embedded Redis, a SeaweedFS S3 server (testkit/services.py), real `darkroom worker` processes (testkit/fleet.py),
and a full-size random-weight model (bench/fullsize.py) published to storage as the conversion job publishes it:
the IR files under the artifact's prefix, then its manifest, then the model's default pointer.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

ACCESS_KEY, SECRET_KEY, BUCKET = "darkroom-bench", "darkroom-bench-secret-key", "bench"


@dataclass
class Rig:
    root: Path
    settings: Any  # broker.settings.Settings
    env: dict[str, str]  # what a worker needs to reach S3

    def worker(self, name: str, queues: list[str], *, cores: str | None = None, **changes: Any) -> Any:
        """A WorkerProcess (not started) with its own log; `changes` override Settings fields."""
        from dataclasses import replace

        from testkit.fleet import WorkerProcess

        args = ["--cores", cores] if cores else []
        return WorkerProcess(replace(self.settings, **changes), queues, self.root / f"{name}.log",
                             extra_env=self.env, extra_args=args)

    def render(self, queue: str, count: int, *, steps: int, size: int, seed: int,
               timeout: float = 3600) -> tuple[float, Any]:
        """Submit `count` images to `queue` and wait for them all: (seconds, BatchSummary)."""
        from darkroom import submit

        started = time.perf_counter()
        handle = submit([f"a lighthouse on a cliff at dusk, take {seed}-{i}" for i in range(count)], model="bench",
                        seed=seed, steps=steps, width=size, height=size, queue=queue, settings=self.settings)
        summary = handle.wait(timeout=timeout, poll=0.05)
        if summary.done != count:
            raise RuntimeError(f"{summary.failed} of {count} images failed: {summary.items}")
        return time.perf_counter() - started, summary


@contextmanager
def queue_rig(root: Path, variant: str, work: Path) -> Iterator[Rig]:
    """Redis + SeaweedFS + the model published as "bench"; the producer in this process reads S3 too."""
    from broker.embedded import EmbeddedRedis
    from broker.settings import Settings
    from storage.s3 import S3Storage
    from testkit.services import SeaweedS3

    class BigSeaweed(SeaweedS3):
        # Multi-GB models and blobs: `weed mini`'s 128 MB volumes and disk-derived volume count run out.
        def command(self) -> list[str]:
            return [*super().command(), "-master.volumeSizeLimitMB=1024", "-volume.max=64"]

    redis = EmbeddedRedis.start(data_dir=root / "redis")
    weed = BigSeaweed.start(root / "weed", access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    env = {"DARKROOM_S3_ENDPOINT": weed.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
           "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        storage = S3Storage(BUCKET, "darkroom", endpoint_url=weed.endpoint, access_key=ACCESS_KEY,
                            secret_key=SECRET_KEY)
        storage.ensure_bucket()
        t0 = time.perf_counter()
        publish(storage, variant, work)
        print(f"published {variant} to S3 in {time.perf_counter() - t0:.0f} s", flush=True)
        settings = Settings(broker_url=redis.url, storage_url=f"s3://{BUCKET}/darkroom", cache_dir=root / "cache")
        yield Rig(root, settings, env)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        weed.stop()
        redis.stop()


def publish(storage: Any, variant: str, work: Path) -> str:
    """The converted model into storage as model "bench", as workers/convert/job.py would leave it."""
    from fullsize import fullsize_model

    from storage import keys
    from tasks.models import set_default
    from tasks.schemas import ConvertJob
    from workers.convert.job import _manifest
    from workers.convert.sd import fingerprint_source

    source, ir = fullsize_model(variant, work)  # type: ignore[arg-type]
    fingerprint = fingerprint_source(source, weight_format="fp16")
    storage.upload_dir(ir, keys.model_artifact_prefix("bench", "fp16", fingerprint))
    manifest = _manifest(ConvertJob(name="bench", source=str(source)), "bench", "fp16", fingerprint, ir, "sd")
    storage.put_json(keys.model_artifact_manifest_key("bench", "fp16", fingerprint), manifest)
    set_default(storage, "bench", "fp16", fingerprint, reason="bench")
    return fingerprint
