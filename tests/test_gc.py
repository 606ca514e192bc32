"""Retention (`darkroom gc`, broker/gc.py): exactly what goes and what stays, on a local folder and on a real S3
server (SeaweedFS), with a real Redis saying which batches still run; the command line, and the schedule run by a
real celery beat and worker.

Storage is filled directly under the real keys. Ages come from what the objects record (a manifest's `finished`,
an artifact manifest's `created`): S3 lets nobody set an object's time. The fallback to object times is tested on
local storage, where os.utime can set them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.gc import GcReport, collect_garbage, format_duration, parse_duration
from broker.progress import BatchProgress
from broker.settings import Settings
from darkroom.cli import main
from storage import LocalStorage, Storage, keys
from tasks.schemas import ItemResult
from testkit.fleet import REPO, running_worker
from tests.conftest import queue_settings_for, redis_db_url, s3_bucket

NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=40)
RECENT = NOW - timedelta(days=1)
MONTH = timedelta(days=30)


def fp(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()[:16]


F32, F16, DEFAULT, HISTORY, CANDIDATE, FRESH, PINNED = (fp(x) for x in (
    "fp32", "fp16", "default", "history", "candidate", "fresh", "pinned"))
N_OLDER, N_NEWER, Q_OLDER, Q_NEWER, GONE = (fp(x) for x in ("n-older", "n-newer", "q-older", "q-newer", "gone"))
SIGNATURE = fp("cpu-signature")


@pytest.fixture(scope="module")
def progress(redis_server: Any) -> Iterator[BatchProgress]:
    progress = BatchProgress(redis_db_url(redis_server, 8))
    progress.client.flushdb()
    yield progress
    progress.close()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    storage = s3_bucket(request.getfixturevalue("s3_server"), "retention", f"t-{uuid.uuid4().hex[:12]}")
    # Tiny pages and bulk deletes, so a few dozen objects take several of each against the real server.
    storage.list_page_size, storage.delete_batch_size = 7, 5
    return storage


# --- building storage as producers and workers leave it ---------------------------------------------------


def put_batch(storage: Storage, batch: str, *, state: str | None, finished: datetime | None,
              pins: tuple[str, str, str] = ("m", "fp32", F32), items: int = 2) -> list[str]:
    """A batch folder: request, images, item records, contact sheet, adherence; a manifest unless `state` is None."""
    model, precision, fingerprint = pins
    storage.put_json(keys.batch_request_key(batch), {"batch_id": batch, "model": model, "precision": precision,
                                                     "fingerprint": fingerprint, "total": items})
    for i in range(items):
        storage.put_bytes(keys.image_key(batch, i), b"\x89PNG" + bytes(100 * (i + 1)), "image/png")
        storage.put_json(keys.item_record_key(batch, i), {"batch_id": batch, "index": i, "status": "done"})
    storage.put_bytes(keys.contact_sheet_key(batch), b"\x89PNG sheet", "image/png")
    storage.put_json(keys.batch_adherence_key(batch), {"accuracy": 100.0})
    if state is not None:
        manifest: dict[str, Any] = {"batch_id": batch, "state": state, "total": items, "items": []}
        if finished is not None:
            manifest["finished"] = finished.isoformat()
        storage.put_json(keys.batch_manifest_key(batch), manifest)
    return storage.list_keys(keys.batch_images_prefix(batch))


def put_artifact(storage: Storage, name: str, precision: str, fingerprint: str, *, created: datetime | None,
                 manifest: bool = True) -> list[str]:
    prefix = keys.model_artifact_prefix(name, precision, fingerprint)
    storage.put_bytes(prefix + "unet/openvino_model.xml", b"<net/>")
    storage.put_bytes(prefix + "unet/openvino_model.bin", bytes(4096))
    if precision == "int8":
        storage.put_json(keys.model_report_key(name, precision, fingerprint), {"decision": {"passed": True}})
    if manifest:
        record: dict[str, Any] = {"name": name, "precision": precision, "fingerprint": fingerprint, "passed": True}
        if created is not None:
            record["created"] = created.isoformat()
        storage.put_json(keys.model_artifact_manifest_key(name, precision, fingerprint), record)
    return storage.list_keys(prefix)


def put_blobs(storage: Storage, name: str, precision: str, fingerprint: str) -> list[str]:
    folder = keys.compiled_blob_prefix("CPU", SIGNATURE, name, precision, fingerprint, weightless=True)
    for blob in ("1234.blob", "5678.blob"):
        storage.put_bytes(keys.compiled_blob_key(folder, blob), bytes(2048))
    return storage.list_keys(folder)


def fill(storage: Storage, progress: BatchProgress, tag: str) -> tuple[set[str], set[str]]:
    """Everything retention judges, in one store: (keys that must go, keys that must stay)."""
    go: set[str] = set()
    stay: set[str] = set()
    # Batches: finished long ago (both finished states) go; a recent one, one without a manifest (running) and a
    # resubmitted one that Redis counts as running stay, however old.
    go |= {*put_batch(storage, f"{tag}-old", state="completed", finished=OLD),
           *put_batch(storage, f"{tag}-old-failures", state="completed_with_failures", finished=OLD)}
    stay |= {*put_batch(storage, f"{tag}-recent", state="completed", finished=RECENT),
             *put_batch(storage, f"{tag}-running", state=None, finished=None, pins=("m", "int8", PINNED)),
             *put_batch(storage, f"{tag}-resubmitted", state="completed", finished=OLD)}
    progress.start(f"{tag}-resubmitted", 2, {})
    progress.record(ItemResult(batch_id=f"{tag}-resubmitted", index=0, status="done"))
    # Model m: float artifacts stay however old; the default and its rollback history stay; an old unpromoted INT8
    # candidate goes; a recent one stays, and so does an old one that a running batch was submitted with.
    stay |= {*put_artifact(storage, "m", "fp32", F32, created=OLD - MONTH),
             *put_artifact(storage, "m", "fp16", F16, created=OLD - MONTH),
             *put_artifact(storage, "m", "int8", DEFAULT, created=OLD),
             *put_artifact(storage, "m", "int8", HISTORY, created=OLD - MONTH),
             *put_artifact(storage, "m", "int8", FRESH, created=RECENT),
             *put_artifact(storage, "m", "int8", PINNED, created=OLD)}
    go |= set(put_artifact(storage, "m", "int8", CANDIDATE, created=OLD))
    history = [{"precision": "fp32", "fingerprint": F32}, {"precision": "int8", "fingerprint": HISTORY}]
    storage.put_json(keys.model_default_key("m"), {"precision": "int8", "fingerprint": DEFAULT, "history": history})
    storage.put_json(keys.calibration_run_key("m", "20250101T000000Z"), {"status": "done"})
    stay |= {keys.model_default_key("m"), keys.calibration_run_key("m", "20250101T000000Z")}
    # Model n has no default record: new batches use its newest artifact, which stays; the older candidate goes.
    go |= set(put_artifact(storage, "n", "int8", N_OLDER, created=OLD - MONTH))
    stay |= set(put_artifact(storage, "n", "int8", N_NEWER, created=OLD))
    # Model q: float default; of two old unpromoted candidates the newest stays (`--precision int8` picks it).
    stay |= {*put_artifact(storage, "q", "fp32", F32, created=OLD - MONTH),
             *put_artifact(storage, "q", "int8", Q_NEWER, created=OLD)}
    go |= set(put_artifact(storage, "q", "int8", Q_OLDER, created=OLD - MONTH))
    storage.put_json(keys.model_default_key("q"), {"precision": "fp32", "fingerprint": F32, "history": []})
    stay.add(keys.model_default_key("q"))
    # Compiled blobs: of live artifacts they stay; of a deleted model and of the candidate going now, they go.
    stay |= {*put_blobs(storage, "m", "fp32", F32), *put_blobs(storage, "m", "int8", DEFAULT)}
    go |= {*put_blobs(storage, "gone", "fp16", GONE), *put_blobs(storage, "m", "int8", CANDIDATE)}
    # Uploads are not retention's.
    storage.put_bytes(keys.control_image_key("a" * 64), b"\x89PNG control")
    storage.put_bytes(keys.init_image_key("b" * 64), b"\x89PNG init")
    stay |= {keys.control_image_key("a" * 64), keys.init_image_key("b" * 64)}
    return go, stay


def summary(report: GcReport) -> dict[str, Any]:
    data = report.to_dict()
    data.pop("dry_run")
    return data


# --- what goes and what stays ---------------------------------------------------------------------------


def test_gc_deletes_exactly_the_old_finished_unpromoted_and_orphaned(store: Storage, progress: BatchProgress) -> None:
    tag = uuid.uuid4().hex[:8]
    go, stay = fill(store, progress, tag)
    before = {o.key: o.size for o in store.list_objects("")}
    assert set(before) == go | stay
    # A dry run deletes nothing and reports what the real run then deletes.
    dry = collect_garbage(store, progress, older_than=MONTH, dry_run=True, now=NOW)
    assert {o.key: o.size for o in store.list_objects("")} == before
    real = collect_garbage(store, progress, older_than=MONTH, dry_run=False, now=NOW)
    assert summary(dry) == summary(real) and dry.dry_run and not real.dry_run
    assert set(store.list_keys("")) == stay
    # The report: units, objects and bytes per category, and the total.
    assert set(real.batches.units) == {f"{tag}-old", f"{tag}-old-failures"}
    assert set(real.int8_candidates.units) == {f"m/int8/{CANDIDATE}", f"n/int8/{N_OLDER}", f"q/int8/{Q_OLDER}"}
    assert len(real.compiled_blobs.units) == 2 and all(u.startswith("ov-cache/CPU/") for u in real.compiled_blobs.units)
    assert real.objects == len(go) and real.bytes == sum(before[k] for k in go)
    for category, prefix in ((real.batches, "images/"), (real.int8_candidates, "models/"),
                             (real.compiled_blobs, "ov-cache/")):
        gone = [k for k in go if k.startswith(prefix)]
        assert (category.objects, category.bytes) == (len(gone), sum(before[k] for k in gone))
    # Nothing left to do: a second run frees nothing.
    again = collect_garbage(store, progress, older_than=MONTH, dry_run=False, now=NOW)
    assert again.objects == 0 and set(store.list_keys("")) == stay


def test_a_shorter_cutoff_reaches_the_recent_batch_but_never_a_running_one(store: Storage,
                                                                           progress: BatchProgress) -> None:
    tag = uuid.uuid4().hex[:8]
    recent = put_batch(store, f"{tag}-recent", state="completed", finished=NOW - timedelta(hours=13))
    running = put_batch(store, f"{tag}-running", state=None, finished=None)
    report = collect_garbage(store, progress, older_than=parse_duration("12h"), dry_run=False, now=NOW)
    assert report.batches.units == (f"{tag}-recent",) and report.objects == len(recent)
    assert set(store.list_keys("images/")) == set(running)


# --- ages without a recorded time: the objects' own (local storage, where they can be set) --------------------


def age(storage: LocalStorage, keys_: list[str], when: datetime) -> None:
    for key in keys_:
        os.utime(storage.root / key, (when.timestamp(), when.timestamp()))


def test_without_recorded_times_the_newest_object_decides(tmp_path: Path, progress: BatchProgress) -> None:
    store = LocalStorage(tmp_path / "store")
    # Manifests written before they recorded `finished`: the batch's newest object says when it finished.
    old = put_batch(store, "legacy-old", state="completed", finished=None)
    age(store, old, OLD)
    young = put_batch(store, "legacy-young", state="completed", finished=None)
    age(store, young, OLD)
    age(store, [keys.contact_sheet_key("legacy-young")], RECENT)  # one recent object keeps the whole batch
    # INT8 folders without a `created` time, or without a manifest at all (a calibration that died uploading).
    no_created = put_artifact(store, "m", "int8", CANDIDATE, created=None)
    age(store, no_created, OLD)
    died = put_artifact(store, "m", "int8", GONE, created=None, manifest=False)
    age(store, died, OLD)
    uploading = put_artifact(store, "m", "int8", FRESH, created=None, manifest=False)  # files just written
    newest = put_artifact(store, "m", "int8", PINNED, created=RECENT)  # what `--precision int8` picks
    float_old = put_artifact(store, "m", "fp32", F32, created=None)
    age(store, float_old, OLD)
    store.put_json(keys.model_default_key("m"), {"precision": "fp32", "fingerprint": F32, "history": []})
    report = collect_garbage(store, progress, older_than=MONTH, dry_run=False, now=NOW)
    assert report.batches.units == ("legacy-old",)
    assert set(report.int8_candidates.units) == {f"m/int8/{CANDIDATE}", f"m/int8/{GONE}"}
    assert set(store.list_keys("")) == {*young, *uploading, *newest, *float_old, keys.model_default_key("m")}


def test_a_collection_stopped_halfway_is_finished_by_the_next_run(tmp_path: Path, progress: BatchProgress) -> None:
    store = LocalStorage(tmp_path / "store")
    left = put_batch(store, "halfway", state=None, finished=None)
    # What a gc leaves when it stops after deleting the manifest: the marker, and objects without a manifest.
    store.put_json(keys.batch_gc_marker_key("halfway"), {"batch_id": "halfway"})
    report = collect_garbage(store, progress, older_than=MONTH, dry_run=False, now=NOW)
    assert report.batches.units == ("halfway",) and report.batches.objects == len(left) + 1
    assert store.list_keys("") == []


def test_the_manifest_records_when_the_batch_finished_and_keeps_it(tmp_path: Path, progress: BatchProgress) -> None:
    from broker.manifest import write_manifest

    store, batch = LocalStorage(tmp_path / "store"), f"finish-{uuid.uuid4().hex[:8]}"
    progress.start(batch, 1, {})
    progress.record(ItemResult(batch_id=batch, index=0, status="done"))
    write_manifest(progress, store, batch)
    first = store.get_bytes(keys.batch_manifest_key(batch))
    finished = datetime.fromisoformat(json.loads(first)["finished"])
    assert finished.tzinfo is not None and abs(datetime.now(UTC) - finished) < timedelta(minutes=1)
    # Written again (a late duplicate of the last item): the same time, so the same bytes.
    time.sleep(0.01)
    write_manifest(progress, store, batch)
    assert store.get_bytes(keys.batch_manifest_key(batch)) == first


def test_durations() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration("90m") == timedelta(minutes=90)
    assert parse_duration("45s") == timedelta(seconds=45)
    assert parse_duration(" 1d12h ") == timedelta(days=1, hours=12)
    assert parse_duration("1d2h3m4s") == timedelta(days=1, hours=2, minutes=3, seconds=4)
    assert format_duration(parse_duration("1d12h")) == "1d12h" and format_duration(timedelta(hours=36)) == "1d12h"


# --- the command line -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["30", "3x", "d", "12h1d", "-1d", "1.5d", "0s", ""])
def test_a_bad_duration_is_one_line_exit_2_and_deletes_nothing(bad: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStorage(tmp_path / "store")
    kept = put_batch(store, "old", state="completed", finished=OLD)
    # An unreachable broker: a bad duration must fail before anything is reached.
    code = main(["--broker-url", "redis://127.0.0.1:9/0", "--storage-url", str(store.root), "gc",
                 f"--older-than={bad}", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--older-than: {bad!r}" in err and "Traceback" not in err
    assert set(store.list_keys("")) == set(kept)


def test_cli_reports_per_category_and_deletes_unless_dry_run(tmp_path: Path, progress: BatchProgress,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStorage(tmp_path / "store")
    gone = put_batch(store, "old", state="completed", finished=OLD)
    stay = put_batch(store, "recent", state="completed", finished=RECENT)
    flags = ["--broker-url", progress.redis_url, "--storage-url", str(store.root), "gc", "--older-than", "30d"]
    assert main([*flags, "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dry_run"] and report["objects"] == len(gone) and report["older_than"] == "30d"
    assert report["categories"]["batches"] == {"count": 1, "objects": len(gone), "units": ["old"],
                                               "bytes": sum(o.size for o in store.list_objects("images/old/"))}
    assert set(store.list_keys("")) == {*gone, *stay}
    assert main(flags) == 0
    text = capsys.readouterr().out
    assert text.startswith("gc freed, older than 30d (before ")
    assert re.search(rf"batches +1 batch +{len(gone)} objects", text), text
    assert "int8 candidates" in text and "compiled blobs" in text and "total" in text
    assert set(store.list_keys("")) == set(stay)


# --- scheduled: celery beat sends darkroom.gc, a worker on the maintenance queue runs it ----------------------


@pytest.fixture(scope="module")
def gc_settings(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("gc-beat"), redis_db_url(redis_server, 6))


def test_schedule_add_gc_runs_it_from_celery_beat(gc_settings: Settings, tmp_path_factory: pytest.TempPathFactory,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    store = LocalStorage(gc_settings.storage_url)
    gone = put_batch(store, "nightly-old", state="completed", finished=OLD)
    stay = put_batch(store, "nightly-recent", state="completed", finished=RECENT)
    flags = ["--broker-url", gc_settings.broker_url, "--storage-url", gc_settings.storage_url]
    assert main([*flags, "schedule", "add-gc", "--cron", "0 4 * * *", "--older-than", "1d12h"]) == 0
    assert "gc of what is older than 1d12h: cron 0 4 * * *" in capsys.readouterr().out
    assert main([*flags, "schedule", "add-gc", "--every", "1", "--older-than", "oops"]) == 2  # the cron one stays
    assert main([*flags, "schedule", "list", "--json"]) == 0
    (entry,) = [e for e in json.loads(capsys.readouterr().out) if e["name"] == "gc"]
    assert entry["when"] == "cron 0 4 * * *" and entry["job"] == {"older_than": "1d12h", "dry_run": False}
    # Every second instead, so beat sends it now; the worker consumes the maintenance queue only.
    assert main([*flags, "schedule", "add-gc", "--every", "1", "--older-than", "30d"]) == 0
    beat = subprocess.Popen([sys.executable, "-m", "darkroom", "beat", "--loglevel", "WARNING"], cwd=REPO,
                            env={**os.environ, **gc_settings.as_env(), "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with running_worker(gc_settings, ["maintenance"], tmp_path_factory) as worker:
            deadline = time.monotonic() + 60
            while store.list_keys(keys.batch_images_prefix("nightly-old")) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert set(store.list_keys("")) == set(stay), worker.log_tail()
            log = worker.log_path.read_text()
            assert "darkroom.gc" in log and "gc: deleted batches nightly-old (" in log, worker.log_tail()
    finally:
        beat.terminate()
        beat.wait(timeout=30)
        assert main([*flags, "schedule", "remove-gc"]) == 0
    assert gone and "gc: schedule removed" in capsys.readouterr().out
