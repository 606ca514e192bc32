"""Workers tuned to the machine: pinned to cores (`--cores`), and warm from a compiled-blob cache in storage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.settings import Settings
from darkroom import submit, submit_convert
from storage import Storage
from testkit.fleet import REPO, WorkerProcess, run_cli
from tests.conftest import queue_settings_for, redis_db_url, stored_tiny_artifact
from workers.runtime.blob_cache import SharedBlobCache, device_signature
from workers.runtime.device import InvalidCores, parse_cores

# --- --cores ------------------------------------------------------------------------------------------------


def test_parse_cores_reads_the_taskset_syntax() -> None:
    allowed = set(range(16))
    assert parse_cores("0-3,8,10-11", allowed) == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cores(" 5 ", allowed) == (5,)
    assert parse_cores("2,2,1-2", allowed) == (1, 2)


@pytest.mark.parametrize(("text", "message"), [
    ("", "is not a core number"), ("a-b", "'a-b' is not a core number"), ("3-1", "'3-1' is not a valid range"),
    ("-1", "is not a core number"), ("0-3,99", r"core\(s\) 99 not available here; this machine allows 0-15"),
])
def test_parse_cores_rejects_what_cannot_be_pinned(text: str, message: str) -> None:
    with pytest.raises(InvalidCores, match=message):
        parse_cores(text, set(range(16)))


_THREADS_PROBE = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from workers.runtime.device import compile_config
import numpy as np, openvino as ov
import openvino.opset13 as ops
config = compile_config("CPU", cache_dir=Path({cache!r}))
x = ops.parameter([1, 8], np.float32)
model = ov.Model([ops.relu(x)], [x])
compiled = ov.Core().compile_model(model, "CPU", config)
print(json.dumps({{"config": config.get("INFERENCE_NUM_THREADS"),
                  "compiled": int(compiled.get_property("INFERENCE_NUM_THREADS"))}}))
"""


def _threads(tmp_path: Path, cores: set[int] | None) -> dict:
    code = _THREADS_PROBE.format(repo=str(REPO), cache=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                          preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to pin to fewer than all")
def test_a_pinned_process_compiles_with_exactly_its_cores_as_threads(tmp_path: Path) -> None:
    one = min(os.sched_getaffinity(0))
    assert _threads(tmp_path, {one}) == {"config": "1", "compiled": 1}
    unpinned = _threads(tmp_path, None)
    assert unpinned["config"] is None  # the plugin's own choice: every core
    assert unpinned["compiled"] == len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("tuning"), redis_db_url(redis_server, 0))


@pytest.fixture(scope="module")
def pinned_worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    core = str(min(os.sched_getaffinity(0)))
    worker = WorkerProcess(settings, ["generate.CPU", "convert"], tmp_path_factory.mktemp("logs") / "w.log",
                           extra_args=["--cores", core])
    try:
        yield worker.start()
    finally:
        worker.stop()


def _allowed_cpus(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list"))


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(c) for c in children]
    return found


def test_a_worker_pinned_with_cores_runs_its_pool_on_those_cores(pinned_worker: WorkerProcess, settings: Settings,
                                                                 tiny_sd_dir: Path) -> None:
    assert pinned_worker.process is not None
    core = str(min(os.sched_getaffinity(0)))
    converted = submit_convert(str(tiny_sd_dir), name="tiny-pinned", weight_format="fp32",
                               settings=settings).get(timeout=600)
    assert converted["status"] == "done", converted
    summary = submit(["a pinned worker draws"], model="tiny-pinned", steps=2, width=64, height=64, seed=3,
                     settings=settings).wait(timeout=300)
    assert (summary.state, summary.done) == ("completed", 1)
    pool = _children(pinned_worker.process.pid)
    assert pool, "the worker has no pool process"
    for pid in [pinned_worker.process.pid, *pool]:
        assert _allowed_cpus(pid) == core


def test_unknown_cores_are_a_clear_error(settings: Settings) -> None:
    done = run_cli("worker", "--device", "CPU", "--cores", "0-4095", settings=settings, timeout=120)
    assert done.returncode == 2
    assert "--cores: core(s)" in done.stderr and "not available here" in done.stderr
    assert "Traceback" not in done.stderr


# --- the compiled-blob cache shared through storage ------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Storage, str]:
    """The tiny model converted and stored as an artifact, as the conversion job leaves it."""
    storage, fingerprint, _ = stored_tiny_artifact(tiny_sd_dir, tmp_path_factory.mktemp("blob-store"), "tiny-blobs")
    return storage, fingerprint


def _pool(storage: Storage, cache_dir: Path) -> object:
    import openvino as ov

    from workers.runtime.device import compile_config
    from workers.runtime.pool import ModelPool

    core = ov.Core()
    blobs = SharedBlobCache(storage, cache_dir / "ov-cache", device="CPU", signature=device_signature(core, "CPU"))
    config = compile_config("CPU", cache_dir=cache_dir / "ov-cache")
    return ModelPool(storage, cache_dir=cache_dir, device="CPU", ov_config=config, core=core, blob_cache=blobs)


def _blobs(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.rglob("*.blob")}


def test_a_fresh_worker_imports_the_blobs_another_compiled(artifact: tuple[Storage, str], tmp_path: Path) -> None:
    storage, fingerprint = artifact
    # 1. The first worker compiles (text encoder, UNet, VAE decoder) and mirrors its blobs to storage.
    first = _pool(storage, tmp_path / "first")
    image_a = first.get("tiny-blobs", "fp32", fingerprint, width=64, height=64, cfg=True)
    compiled = _blobs(first.blob_cache.local_dir("tiny-blobs", "fp32", fingerprint))
    assert len(compiled) == 3 and (first.stats.blobs_pulled, first.stats.blobs_pushed) == (0, 3)
    stored = [k for k in storage.list_keys("ov-cache/") if k.endswith(".blob")]
    assert {k.rsplit("/", 1)[1] for k in stored} == set(compiled)
    assert all(k.startswith("ov-cache/CPU/") and f"/tiny-blobs/fp32/{fingerprint}/" in k for k in stored)
    # 2. A second worker with an empty local cache pulls them, and OpenVINO imports rather than compiles:
    #    no blob is rewritten, none is added, nothing new goes back to storage.
    second = _pool(storage, tmp_path / "second")
    second.fetch("tiny-blobs", "fp32", fingerprint)
    pulled_dir = second.blob_cache.local_dir("tiny-blobs", "fp32", fingerprint)
    image_b = second.get("tiny-blobs", "fp32", fingerprint, width=64, height=64, cfg=True)
    assert (second.stats.blobs_pulled, second.stats.blobs_pushed) == (3, 0)
    before = _blobs(pulled_dir)
    assert len(before) == 3
    # 3. Same pictures from the imported models.
    kwargs = {"prompt": "a lighthouse", "negative_prompt": "", "steps": 3, "guidance_scale": 7.0, "seed": 5,
              "scheduler": "pndm"}
    assert image_a.generate(**kwargs).image.tobytes() == image_b.generate(**kwargs).image.tobytes()
    assert _blobs(pulled_dir) == before


def test_a_corrupt_shared_blob_costs_a_compile_not_a_job(artifact: tuple[Storage, str], tmp_path: Path) -> None:
    storage, fingerprint = artifact
    kwargs = {"prompt": "still draws", "negative_prompt": "", "steps": 2, "guidance_scale": 1.0, "seed": 1,
              "scheduler": "pndm"}
    shared_before = {k.rsplit("/", 1)[1] for k in storage.list_keys("ov-cache/")}
    seed_pool = _pool(storage, tmp_path / "seed")
    expected = seed_pool.get("tiny-blobs", "fp32", fingerprint, width=64, height=64, cfg=False).generate(**kwargs)
    # The blobs of this shape (other tests may have left blobs of other shapes in storage).
    used = set(_blobs(seed_pool.blob_cache.local_dir("tiny-blobs", "fp32", fingerprint))) - shared_before
    for key in storage.list_keys("ov-cache/"):
        storage.put_bytes(key, b"not a compiled model")
    pool = _pool(storage, tmp_path / "fresh")
    pipeline = pool.get("tiny-blobs", "fp32", fingerprint, width=64, height=64, cfg=False)
    assert pool.stats.blobs_pulled >= len(used) > 0
    assert pipeline.generate(**kwargs).image.tobytes() == expected.image.tobytes()
    # OpenVINO compiled afresh and replaced the bad blobs it was handed; they go back to storage, so the next
    # fresh worker imports instead of compiling.
    local = pool.blob_cache.local_dir("tiny-blobs", "fp32", fingerprint)
    assert all((local / name).read_bytes()[:32] != b"not a compiled model" for name in used)
    stored = {k.rsplit("/", 1)[1]: k for k in storage.list_keys("ov-cache/")}
    rewritten = {p.name for p in local.glob("*.blob") if p.read_bytes()[:32] != b"not a compiled model"}
    assert used <= rewritten and pool.stats.blobs_pushed == len(rewritten)
    assert all(storage.get_bytes(stored[name]) == (local / name).read_bytes() for name in rewritten)
