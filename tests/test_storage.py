"""The storage contract, run against a local folder and a real S3 server (SeaweedFS), plus key rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage import (
    LocalStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageAccessDenied,
    StorageError,
    StorageUnavailable,
    keys,
    open_storage,
)
from storage.base import TEMP_MARKER, atomic_file, safe_local_path
from testkit.services import SeaweedS3, free_port

ACCESS_KEY = "storage-test"
SECRET_KEY = "storage-test-secret-4f1e"
BUCKET = "contract"

BAD_KEYS = ["", "/abs", "..", "a/../b", "a/./b", "a//b", "a\\b", "a\x00b", "tab\there", "dir/", "x" * 1025]


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    tmp = tmp_path_factory.mktemp("seaweed")
    with SeaweedS3.start(tmp, access_key=ACCESS_KEY, secret_key=SECRET_KEY) as s:
        S3Storage(BUCKET, endpoint_url=s.endpoint, access_key=ACCESS_KEY,
                  secret_key=SECRET_KEY).ensure_bucket()
        yield s


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    server: SeaweedS3 = request.getfixturevalue("seaweed")
    # A fresh prefix per test: the tests share one bucket but never see each other's objects.
    return S3Storage(BUCKET, f"t-{uuid.uuid4().hex[:12]}", endpoint_url=server.endpoint,
                     access_key=ACCESS_KEY, secret_key=SECRET_KEY)


# --- the contract, on both backends -------------------------------------------------------------------------


def test_put_get_round_trip(store: Storage) -> None:
    data = bytes(range(256)) * 3
    uri = store.put_bytes("images/b1/00000.png", data, "image/png")
    assert uri == store.uri("images/b1/00000.png")
    assert uri.endswith("/images/b1/00000.png") and uri.split("://")[0] in ("file", "s3")
    assert store.get_bytes("images/b1/00000.png") == data
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""


def test_json_is_sorted_indented_utf8(store: Storage) -> None:
    obj = {"b": [1, 2.5, None], "a": {"prompt": "café ☕", "ok": True}}
    store.put_json("x/manifest.json", obj)
    assert store.get_json("x/manifest.json") == obj
    raw = store.get_bytes("x/manifest.json").decode("utf-8")
    assert raw == json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    with pytest.raises(ValueError):
        store.put_json("x/nan.json", {"v": float("nan")})  # not JSON: other readers would choke on it
    store.put_bytes("x/broken.json", b"{not json")
    with pytest.raises(StorageError, match="not UTF-8 JSON"):
        store.get_json("x/broken.json")


def test_exists_and_delete(store: Storage) -> None:
    assert not store.exists("a/b.txt")
    store.put_bytes("a/b.txt", b"1")
    assert store.exists("a/b.txt")
    assert not store.exists("a/b")
    store.delete("a/b.txt")
    assert not store.exists("a/b.txt")
    store.delete("a/b.txt")  # deleting twice is fine: a re-run job may do it
    with pytest.raises(ObjectNotFound):
        store.get_bytes("a/b.txt")
    with pytest.raises(ObjectNotFound):
        store.get_json("never/was.json")


def test_list_keys_sorted_recursive_and_by_prefix(store: Storage) -> None:
    for key in ["images/b10/00000.png", "images/b1/items/00001.json", "images/b1/00001.png",
                "images/b1/00000.png", "models/m/default.json", "top.txt"]:
        store.put_bytes(key, key.encode())
    assert store.list_keys("images/b1/") == ["images/b1/00000.png", "images/b1/00001.png",
                                             "images/b1/items/00001.json"]
    assert store.list_keys("images/b1") == store.list_keys("images/b1/") + ["images/b10/00000.png"]
    everything = store.list_keys("")
    assert everything == sorted(everything) and len(everything) == 6 and "top.txt" in everything
    assert store.list_keys("nothing/here/") == []
    assert store.list_keys("images/b1/00000.png") == ["images/b1/00000.png"]


def test_list_objects_gives_sizes_and_utc_times(store: Storage) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)  # S3 keeps whole seconds
    for key, size in (("images/b1/00001.png", 3), ("images/b1/items/00001.json", 0), ("images/b10/x", 7)):
        store.put_bytes(key, bytes(size))
    listed = store.list_objects("images/b1/")
    assert [(o.key, o.size) for o in listed] == [("images/b1/00001.png", 3), ("images/b1/items/00001.json", 0)]
    for o in listed:
        assert o.modified.utcoffset() == timedelta(0) and before <= o.modified <= datetime.now(UTC)
    assert [o.key for o in store.list_objects("")] == store.list_keys("")


def test_delete_many_checks_every_key_first_and_ignores_missing_ones(store: Storage) -> None:
    keys_ = [f"d/{i:03d}" for i in range(12)]
    for key in keys_:
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):
        store.delete_many([keys_[0], "bad/../key"])
    assert store.list_keys("d/") == keys_  # nothing deleted
    if isinstance(store, S3Storage):
        store.delete_batch_size = 5  # several DeleteObjects requests against the real server
    assert store.delete_many([*keys_[:11], "d/never-was"]) == 12
    assert store.list_keys("d/") == [keys_[11]]


def test_upload_dir_download_prefix_round_trip(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "ir"
    files = {"model_index.json": b"{}", "unet/openvino_model.xml": b"<net/>",
             "unet/openvino_model.bin": b"w" * 10,
             # Above boto3's 8 MB multipart threshold: the S3 upload goes in parts.
             "vae_decoder/openvino_model.bin": os.urandom(9 * 1024 * 1024)}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    prefix = keys.model_artifact_prefix("tiny", "fp16", "0123abcd")
    uploaded = store.upload_dir(src, prefix)
    assert uploaded == sorted(prefix + rel for rel in files)
    assert store.list_keys(prefix) == uploaded

    out = tmp_path / "out" / "deep"
    written = store.download_prefix(prefix, out)
    assert sorted(p.relative_to(out).as_posix() for p in written) == sorted(files)
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
    assert not [p for p in out.rglob("*") if p.name.startswith(TEMP_MARKER)]
    assert store.download_prefix("models/none/", tmp_path / "empty") == []
    with pytest.raises(ValueError, match="folder prefix"):
        store.upload_dir(src, "no-slash")
    with pytest.raises(ValueError, match="folder prefix"):
        store.download_prefix("no-slash", out)


def test_overwrite_is_atomic_for_readers(store: Storage) -> None:
    old, new = b"o" * 1_500_000, b"N" * 1_000_000
    store.put_bytes("race/obj.bin", old)
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.append(store.get_bytes("race/obj.bin"))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(12):
            store.put_bytes("race/obj.bin", new if i % 2 == 0 else old)
    finally:
        stop.set()
        thread.join()
    assert seen and all(data in (old, new) for data in seen)  # never a prefix, never a mix
    assert store.get_bytes("race/obj.bin") == old
    assert store.list_keys("race/") == ["race/obj.bin"]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_invalid_keys_are_rejected_before_any_io(store: Storage, bad: str) -> None:
    for call in (lambda: store.put_bytes(bad, b"x"), lambda: store.get_bytes(bad), lambda: store.exists(bad),
                 lambda: store.delete(bad), lambda: store.put_json(bad, {})):
        with pytest.raises(ValueError):
            call()


def test_invalid_prefixes_are_rejected(store: Storage) -> None:
    for bad in ["/abs/", "../", "a/../", "a\\b/"]:
        with pytest.raises(ValueError):
            store.list_keys(bad)


# --- download_prefix never writes outside its folder -----------------------------------------------------


@pytest.mark.parametrize("relative", ["..", "../x", "a/../../x", "/etc/passwd", "a\\..\\b", "", "a//b", "./a",
                                      "a/\x00"])
def test_key_to_local_path_guard_rejects_escapes(tmp_path: Path, relative: str) -> None:
    with pytest.raises(StorageError, match="refusing"):
        safe_local_path(tmp_path, relative)


def test_key_to_local_path_guard(tmp_path: Path) -> None:
    expected = tmp_path.resolve() / "unet" / "openvino_model.xml"
    assert safe_local_path(tmp_path, "unet/openvino_model.xml") == expected
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "link").symlink_to(outside)  # a symlink inside the target dir must not lead out of it
    with pytest.raises(StorageError, match="outside"):
        safe_local_path(tmp_path / "dl", "link/x")


def test_download_prefix_with_a_hostile_key_writes_nothing(tmp_path: Path) -> None:
    class HostileListing(LocalStorage):
        """A real local store whose listing also returns a key a hostile bucket writer could create."""

        def list_keys(self, prefix: str) -> list[str]:
            return super().list_keys(prefix) + [prefix + "a/../../../escaped.txt"]

    store = HostileListing(tmp_path / "store")
    store.put_bytes("p/fine.txt", b"fine")
    target = tmp_path / "dl" / "inner"
    with pytest.raises(StorageError, match="refusing"):
        store.download_prefix("p/", target)
    assert not target.exists() and not list(tmp_path.rglob("escaped.txt"))


# --- local specifics ----------------------------------------------------------------------------------------


def test_local_root_is_created_lazily_and_temp_files_stay_hidden(tmp_path: Path) -> None:
    root = tmp_path / "lazy" / "root"
    store = LocalStorage(root)
    assert not store.exists("a") and store.list_keys("") == [] and not root.exists()
    with pytest.raises(ObjectNotFound):
        store.get_bytes("a")
    assert not root.exists()
    assert store.put_bytes("a/b", b"1") == (root / "a" / "b").as_uri()
    assert store.url == root.as_uri() and store.uri("a/") == (root / "a").as_uri() + "/"
    (root / "a" / f"{TEMP_MARKER}b.deadbeef").write_bytes(b"half")  # as a crashed writer leaves it
    assert store.list_keys("") == ["a/b"]
    with pytest.raises(ValueError, match="reserved"):
        store.put_bytes(f"a/{TEMP_MARKER}x", b"1")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("a")  # a folder is not an object


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "obj"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write(b"new but interrupted")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["obj"]


# --- S3 specifics -------------------------------------------------------------------------------------------


def test_s3_wrong_secret_is_access_denied_without_the_secret(seaweed: SeaweedS3) -> None:
    wrong = "definitely-not-the-secret-9c2b"
    store = S3Storage(BUCKET, "x", endpoint_url=seaweed.endpoint, access_key=ACCESS_KEY, secret_key=wrong)
    for call in (lambda: store.get_bytes("a"), lambda: store.list_keys(""),
                 lambda: store.put_bytes("a", b"1"), lambda: store.exists("a")):
        with pytest.raises(StorageAccessDenied) as info:
            call()
        message = str(info.value)
        assert wrong not in message and SECRET_KEY not in message
        assert seaweed.endpoint in message and BUCKET in message and "\n" not in message
    assert wrong not in repr(store) and wrong not in store.url
    unknown = S3Storage(BUCKET, endpoint_url=seaweed.endpoint, access_key="nobody", secret_key=SECRET_KEY)
    with pytest.raises(StorageAccessDenied):
        unknown.list_keys("")


def test_s3_closed_port_is_unavailable_within_seconds() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3Storage(BUCKET, endpoint_url=endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    began = time.monotonic()
    with pytest.raises(StorageUnavailable) as info:
        store.get_bytes("a")
    assert time.monotonic() - began < 8
    assert endpoint in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(StorageUnavailable):
        store.list_keys("")


def test_s3_missing_bucket_names_the_bucket(seaweed: SeaweedS3) -> None:
    store = S3Storage("no-such-bucket", endpoint_url=seaweed.endpoint, access_key=ACCESS_KEY,
                      secret_key=SECRET_KEY)
    for call in (lambda: store.list_keys(""), lambda: store.get_bytes("a"),
                 lambda: store.put_bytes("a", b"1")):
        with pytest.raises(StorageError, match="'no-such-bucket'") as info:
            call()
        assert not isinstance(info.value, ObjectNotFound)


def test_s3_client_is_lazy_and_ensure_bucket_is_idempotent(seaweed: SeaweedS3) -> None:
    store = S3Storage("lazy-bucket", "p", endpoint_url=seaweed.endpoint, access_key=ACCESS_KEY,
                      secret_key=SECRET_KEY)
    assert store._client is None and store.url == "s3://lazy-bucket/p"
    store.ensure_bucket()
    store.ensure_bucket()
    assert store.put_bytes("k", b"v") == "s3://lazy-bucket/p/k"
    assert S3Storage("lazy-bucket", endpoint_url=seaweed.endpoint, access_key=ACCESS_KEY,
                     secret_key=SECRET_KEY).list_keys("") == ["p/k"]


# --- names and keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["..", "a..b", "a/b", "/abs", "\x00", "", "x" * 129, "abc\n", "-lead",
                                 ".hidden", "a b", "a\\b"])
def test_check_name_rejects(bad: str) -> None:
    with pytest.raises(keys.InvalidName) as info:
        keys.check_name("batch", bad)
    assert "batch" in str(info.value) and repr(bad) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_check_name_accepts_and_keys_are_spelled_here() -> None:
    assert keys.check_name("batch", "batch-01.x") == "batch-01.x"
    assert keys.check_name("model", "x" * 128) == "x" * 128
    assert keys.image_key("b1", 7) == "images/b1/00007.png"
    assert keys.item_record_key("b1", 7) == "images/b1/items/00007.json"
    assert keys.batch_request_key("b1") == "images/b1/request.json"
    assert keys.batch_manifest_key("b1") == "images/b1/manifest.json"
    assert keys.contact_sheet_key("b1") == "images/b1/contact-sheet.png"
    assert keys.models_prefix() == "models/"
    assert keys.model_artifact_prefix("sd", "int8", "00ff00ff") == "models/sd/int8/00ff00ff/"
    manifest = keys.model_artifact_manifest_key("sd", "fp32", "00ff00ff")
    assert manifest == "models/sd/fp32/00ff00ff/manifest.json"
    assert keys.model_default_key("sd") == "models/sd/default.json"
    for bad_call in (lambda: keys.image_key("../x", 0), lambda: keys.image_key("b", -1),
                     lambda: keys.image_key("b", True),
                     lambda: keys.model_artifact_prefix("sd", "fp16", "XYZ"),
                     lambda: keys.model_artifact_prefix("sd", "default.json", "00ff00ff"),
                     lambda: keys.model_default_key("a/b")):
        with pytest.raises(keys.InvalidName):
            bad_call()


def test_batch_images_prefix_is_the_folder_of_every_batch_key() -> None:
    prefix = keys.batch_images_prefix("b1")
    assert prefix == "images/b1/"  # the spelling batches stored by earlier versions live under
    batch_keys = [keys.image_key("b1", 7), keys.item_record_key("b1", 7), keys.batch_request_key("b1"),
                  keys.batch_manifest_key("b1"), keys.contact_sheet_key("b1"), keys.batch_adherence_key("b1")]
    assert [keys.relative_key(prefix, k) for k in batch_keys] == [
        "00007.png", "items/00007.json", "request.json", "manifest.json", "contact-sheet.png", "adherence.json"]
    # Batch b10's objects are not b1's, though "images/b1" is a prefix of their keys.
    with pytest.raises(keys.InvalidName):
        keys.relative_key(prefix, keys.image_key("b10", 0))
    for bad in ("../x", "a/b", ""):
        with pytest.raises(keys.InvalidName):
            keys.batch_images_prefix(bad)


def test_relative_key_only_inside_a_folder() -> None:
    assert keys.relative_key("models/sd/", "models/sd/fp16/00ff00ff/unet/openvino_model.xml") == \
        "fp16/00ff00ff/unet/openvino_model.xml"
    for prefix, key in (("models/sd/", "models/sd/"), ("models/sd", "models/sd/x"), ("images/b/", "models/b/x")):
        with pytest.raises(keys.InvalidName):
            keys.relative_key(prefix, key)


def test_model_prefix_holds_the_models_objects() -> None:
    prefix = keys.model_prefix("sd")
    assert prefix == "models/sd/"
    for key in (keys.model_default_key("sd"), keys.calibration_run_key("sd", "20240101T000000Z"),
                keys.model_artifact_manifest_key("sd", "int8", "00ff00ff")):
        assert key.startswith(prefix)
    assert keys.calibration_runs_prefix("sd") == "models/sd/calibrations/"
    with pytest.raises(keys.InvalidName):
        keys.model_prefix("a/b")


def test_artifact_file_key_spells_files_inside_the_artifact() -> None:
    assert keys.artifact_file_key("sd", "fp16", "00ff00ff", "tokenizer/tokenizer.json") == \
        "models/sd/fp16/00ff00ff/tokenizer/tokenizer.json"
    assert keys.model_report_key("sd", "int8", "00ff00ff") == "models/sd/int8/00ff00ff/report.json"
    assert keys.model_report_key("sd", "int8", "00ff00ff").endswith("/" + keys.ARTIFACT_REPORT)
    assert keys.model_artifact_manifest_key("sd", "int8", "00ff00ff").endswith("/" + keys.ARTIFACT_MANIFEST)
    for bad in ("", "/abs", "../x", "tokenizer/../../x", "a//b", "a/", "a/.hidden", "a\\b"):
        with pytest.raises(keys.InvalidName):
            keys.artifact_file_key("sd", "fp16", "00ff00ff", bad)


@pytest.mark.parametrize("parts", [("sd", "fp32", "00ff00ff"), ("tiny-sd.v1_5", "int8", "0123456789abcdef"),
                                   ("x" * 128, "fp16", "a" * 128)])
def test_artifact_manifest_key_round_trip(parts: tuple[str, str, str]) -> None:
    key = keys.model_artifact_manifest_key(*parts)
    assert keys.parse_artifact_manifest_key(key) == parts
    assert keys.is_artifact_manifest_key(key)


@pytest.mark.parametrize("key", [
    keys.batch_manifest_key("b1"),  # a manifest, but a batch's
    "images/sd/fp32/00ff00ff/manifest.json",  # five parts ending in manifest.json, outside models/
    keys.model_default_key("sd"),
    keys.model_report_key("sd", "fp32", "00ff00ff"),
    keys.calibration_run_key("sd", "20240101T000000Z"),
    keys.artifact_file_key("sd", "fp32", "00ff00ff", "unet/manifest.json"),  # a file of that name inside one
    "models/sd/default.json/00ff00ff/manifest.json",  # not a precision a manifest key can have
    "models/sd/fp32/XYZ/manifest.json",
    "models/../fp32/00ff00ff/manifest.json",
    "models/sd/fp32/00ff00ff/manifest.json.part",
    "models/sd/fp32/00ff00ff/",
    "",
])
def test_other_keys_are_not_taken_for_an_artifact_manifest(key: str) -> None:
    assert not keys.is_artifact_manifest_key(key)
    with pytest.raises(keys.InvalidName):
        keys.parse_artifact_manifest_key(key)


def test_list_artifacts_reads_only_artifact_manifests(tmp_path: Path) -> None:
    from tasks.models import list_artifacts

    store = LocalStorage(tmp_path / "store")
    for name, precision, fingerprint in (("sd", "fp32", "00ff00ff"), ("sd", "int8", "11ff11ff"),
                                         ("other", "fp16", "22ff22ff")):
        store.put_json(keys.model_artifact_manifest_key(name, precision, fingerprint),
                       {"name": name, "precision": precision, "fingerprint": fingerprint, "created": fingerprint})
        store.put_json(keys.model_report_key(name, precision, fingerprint), {"not": "a manifest"})
        store.put_json(keys.artifact_file_key(name, precision, fingerprint, "unet/manifest.json"), {"not": "one"})
    store.put_json(keys.model_default_key("sd"), {"precision": "fp32", "fingerprint": "00ff00ff"})
    store.put_json(keys.calibration_run_key("sd", "20240101T000000Z"), {"status": "done"})
    store.put_json(keys.batch_manifest_key("sd"), {"items": []})
    assert [(m["name"], m["fingerprint"]) for m in list_artifacts(store)] == [
        ("other", "22ff22ff"), ("sd", "00ff00ff"), ("sd", "11ff11ff")]
    assert [m["fingerprint"] for m in list_artifacts(store, "sd")] == ["00ff00ff", "11ff11ff"]


def test_keys_are_traced_back_to_their_batch_artifact_or_blob_folder() -> None:
    for key in (keys.image_key("b1", 3), keys.contact_sheet_key("b1"), keys.item_record_key("b1", 0),
                keys.batch_gc_marker_key("b1")):
        assert keys.batch_of(key) == "b1" and key.startswith(keys.images_prefix())
    artifact = ("sd", "int8", "00ff00ff")
    for key in (keys.model_artifact_manifest_key(*artifact), keys.artifact_file_key(*artifact, "unet/x.bin")):
        assert keys.artifact_of(key) == artifact
    folder = keys.compiled_blob_prefix("GPU.0", "0123456789abcdef", *artifact, weightless=True)
    assert keys.compiled_blob_folder_of(keys.compiled_blob_key(folder, "1.blob")) == (folder, artifact)
    assert folder.startswith(keys.compiled_blobs_prefix())
    for bad in ("images/b1", "images/b1/", "images/../x/y", "models/sd/x.png", "top.txt"):
        with pytest.raises(keys.InvalidName):
            keys.batch_of(bad)
    for bad in (keys.model_default_key("sd"), keys.calibration_run_key("sd", "20240101T000000Z"),
                "models/sd/fp32/XYZ/manifest.json", "models/sd/fp32/00ff00ff/", keys.image_key("b1", 0)):
        with pytest.raises(keys.InvalidName):
            keys.artifact_of(bad)
    for bad in (folder, folder + "sub/", "ov-cache/CPU/not-hex/sd/int8/00ff00ff/1.blob", keys.image_key("b", 0)):
        with pytest.raises(keys.InvalidName):
            keys.compiled_blob_folder_of(bad)


def test_compiled_blob_keys_keep_their_stored_spelling() -> None:
    full = keys.compiled_blob_prefix("CPU", "0123456789abcdef", "sd", "fp16", "00ff00ff")
    assert full == "ov-cache/CPU/0123456789abcdef/sd/fp16/00ff00ff/"
    # Weightless blobs live under a signature derived from the device's; pinned, so blobs shared before still match.
    weightless = keys.compiled_blob_prefix("CPU", "0123456789abcdef", "sd", "fp16", "00ff00ff", weightless=True)
    assert weightless == "ov-cache/CPU/e6faf20518b6b2f2/sd/fp16/00ff00ff/"
    key = keys.compiled_blob_key(weightless, "3410716377939914843.blob")
    assert key == weightless + "3410716377939914843.blob"
    assert keys.relative_key(weightless, key) == "3410716377939914843.blob"
    for prefix, name in ((full, "../x.blob"), (full, "a/b.blob"), (full, ".blob"), ("models/sd/", "x.blob"),
                         (full[:-1], "x.blob")):
        with pytest.raises(keys.InvalidName):
            keys.compiled_blob_key(prefix, name)
    with pytest.raises(keys.InvalidName):
        keys.compiled_blob_prefix("CPU", "not-a-digest", "sd", "fp16", "00ff00ff", weightless=True)


# --- open_storage -------------------------------------------------------------------------------------------


def test_open_storage_picks_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DARKROOM_STORAGE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    default = open_storage()
    assert isinstance(default, LocalStorage) and default.root == tmp_path.resolve() / "darkroom-data"
    assert open_storage("rel/dir").root == tmp_path.resolve() / "rel" / "dir"
    assert open_storage(f"file://{tmp_path}/a%20b").root == tmp_path / "a b"
    monkeypatch.setenv("DARKROOM_STORAGE_URL", "s3://my-bucket/some/prefix/")
    s3 = open_storage()
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("my-bucket", "some/prefix")
    assert isinstance(open_storage(str(tmp_path / "explicit")), LocalStorage)  # an argument beats the env
    with pytest.raises(ValueError, match="unknown storage URL scheme 'gs'"):
        open_storage("gs://bucket/x")
    with pytest.raises(ValueError) as info:
        open_storage("s3://AKIA:hunter2@bucket/x")
    assert "hunter2" not in str(info.value)
    for bad in ["s3://Bad_Bucket/x", "s3:///nobucket", "file://host/x", ""]:
        with pytest.raises(ValueError):
            open_storage(bad)


def test_settings_and_open_storage_default_to_the_same_store(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.settings import Settings

    monkeypatch.delenv("DARKROOM_STORAGE_URL", raising=False)
    assert Settings.from_env().storage_url == Settings().storage_url
    assert open_storage(Settings.from_env().storage_url).root == open_storage().root


def test_open_storage_s3_from_env_talks_to_the_server(seaweed: SeaweedS3,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"DARKROOM_S3_ENDPOINT": seaweed.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                        "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    store = open_storage(f"s3://{BUCKET}/from-env")
    assert store.put_json("k.json", {"a": 1}) == f"s3://{BUCKET}/from-env/k.json"
    assert store.get_json("k.json") == {"a": 1}


def test_importing_storage_pulls_in_no_heavy_packages() -> None:
    code = ("import sys, storage, storage.s3\n"
            "heavy = {'torch', 'diffusers', 'openvino', 'nncf', 'celery', 'boto3'}\n"
            "print(sorted(heavy & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.strip() == "[]"
