"""Security on real parts: a Redis of its own with a password and an ACL user for the workers, the real S3
server with enforced keys, a real worker. See docs/security.md for what each test stands for."""

from __future__ import annotations

import base64
import json
import pickle
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from broker.app import make_app
from broker.embedded import EmbeddedRedis
from broker.settings import Settings, redact_url
from darkroom import submit
from storage import keys
from storage.s3 import S3Storage
from tasks.errors import InvalidRequest
from tasks.names import GENERATE_TASK
from testkit.fleet import WorkerProcess, convert_model, run_cli, running_worker
from tests.conftest import S3_SECRET_KEY, exported_env, queue_settings_for, s3_bucket, s3_env

BUCKET = "secure"
ADMIN_PASSWORD = "sec-admin-Redis-pw-41"
WORKER_USER = "darkroom-worker"
WORKER_PASSWORD = "sec-worker-Redis-pw-97"
# The line docs/security.md documents; the test creates exactly this user.
ACL_LINE = (
    f"ACL SETUSER {WORKER_USER} on >{WORKER_PASSWORD} resetkeys resetchannels "
    "~generate.* ~convert* ~calibrate* ~maintenance* ~unacked ~unacked_index ~unacked_mutex ~_kombu.* "
    "~*.celery.pidbox* ~celery-task-meta-* ~darkroom:* &* -@all +@read +@write +@keyspace +@list +@hash "
    "+@set +@sortedset +@string +@pubsub +@transaction +@connection +@scripting +time -@dangerous"
)


@pytest.fixture(scope="module")
def secure_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis.start(password=ADMIN_PASSWORD, data_dir=tmp_path_factory.mktemp("secredis"))
    admin = redis.Redis(port=server.port, password=ADMIN_PASSWORD)
    admin.execute_command(*ACL_LINE.split())
    admin.close()
    yield server
    server.stop()


def worker_url(server: EmbeddedRedis) -> str:
    return f"redis://{WORKER_USER}:{quote(WORKER_PASSWORD, safe='')}@127.0.0.1:{server.port}/0"


@pytest.fixture(scope="module")
def s3(s3_server: Any) -> S3Storage:
    return s3_bucket(s3_server, BUCKET, "farm")


@pytest.fixture(scope="module")
def sec_settings(secure_redis: EmbeddedRedis, s3: S3Storage, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("sec"), worker_url(secure_redis),
                              storage_url=f"s3://{BUCKET}/farm")


@pytest.fixture(scope="module")
def env(s3_server: Any) -> Iterator[dict[str, str]]:
    with exported_env(s3_env(s3_server.endpoint)) as values:  # the producer in this process reads S3 too
        yield values


@pytest.fixture(scope="module")
def worker(sec_settings: Settings, env: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker that logs in as the ACL user, not as the admin."""
    with running_worker(sec_settings, ["generate.CPU", "convert"], tmp_path_factory, extra_env=env) as process:
        yield process


@pytest.fixture(scope="module")
def model(worker: WorkerProcess, sec_settings: Settings, tiny_sd_dir: Path) -> str:
    convert_model(sec_settings, tiny_sd_dir, "guarded")
    return "guarded"


def test_the_acl_worker_user_runs_a_batch_and_cannot_do_more(model: str, sec_settings: Settings,
                                                             secure_redis: EmbeddedRedis) -> None:
    summary = submit([f"acl prompt {i}" for i in range(3)], model=model, steps=2, seed=3,
                     settings=sec_settings).wait(timeout=300)
    assert (summary.done, summary.failed) == (3, 0), [i.error for i in summary.items]
    limited = redis.Redis.from_url(worker_url(secure_redis))
    try:
        for command in (("FLUSHALL",), ("CONFIG", "GET", "requirepass"), ("KEYS", "*"), ("SET", "other-app:x", "1"),
                        ("ACL", "LIST")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                limited.execute_command(*command)
    finally:
        limited.close()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))  # unpickling this creates the file


def test_a_pickled_message_is_refused_never_executed_and_the_worker_keeps_serving(
        model: str, sec_settings: Settings, secure_redis: EmbeddedRedis, worker: WorkerProcess,
        tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    admin = redis.Redis(port=secure_redis.port, password=ADMIN_PASSWORD)
    # A real Celery protocol-2 message, pickled: Celery itself writes it to a queue nobody consumes...
    app = make_app(sec_settings)
    app.send_task(GENERATE_TASK, kwargs={"job": {}}, queue="generate.sec-hold", serializer="pickle", task_id="evil-1")
    app.close()
    envelope = json.loads(admin.rpop("generate.sec-hold"))
    assert envelope["content-type"] == "application/x-python-serialize"
    # ... then its body is swapped for a payload that would create a file, and it is pushed raw.
    envelope["body"] = base64.b64encode(pickle.dumps(_Evil(marker))).decode()
    envelope["properties"]["delivery_info"]["routing_key"] = "generate.CPU"
    admin.lpush("generate.CPU", json.dumps(envelope))
    deadline = time.monotonic() + 60
    while admin.llen("generate.CPU") and time.monotonic() < deadline:
        time.sleep(0.2)
    summary = submit(["after the pickle"], model=model, steps=2, seed=9, settings=sec_settings).wait(timeout=300)
    assert summary.done == 1
    assert not marker.exists(), "the pickled payload was executed"
    assert worker.process is not None and worker.process.poll() is None
    log = worker.log_path.read_text(errors="replace")
    assert "untrusted content" in log and "pickle" in log
    assert admin.llen("generate.CPU") == 0 and not admin.hexists("unacked", envelope["properties"]["delivery_tag"])
    admin.close()


def test_no_secret_appears_in_logs_messages_results_or_storage(model: str, sec_settings: Settings,
                                                               secure_redis: EmbeddedRedis, worker: WorkerProcess,
                                                               s3: S3Storage) -> None:
    handle = submit(["secret-free prompt"], model=model, steps=2, seed=4, settings=sec_settings, batch_id="nosecret")
    assert handle.wait(timeout=300).done == 1
    secrets = [WORKER_PASSWORD.encode(), ADMIN_PASSWORD.encode(), S3_SECRET_KEY.encode()]
    assert worker_url(secure_redis) in sec_settings.broker_url
    log = worker.log_path.read_bytes()
    assert b"***" in log or b"darkroom-worker" in log  # the worker did print its broker URL, redacted
    admin = redis.Redis(port=secure_redis.port, password=ADMIN_PASSWORD)
    blobs = [log]
    for key in admin.scan_iter(count=1000):
        kind = admin.type(key)
        if kind == b"string":
            blobs.append(admin.get(key) or b"")
        elif kind == b"list":
            blobs.extend(admin.lrange(key, 0, -1))
        elif kind == b"hash":
            blobs.extend(v for kv in admin.hgetall(key).items() for v in kv)
        elif kind == b"set":
            blobs.extend(admin.smembers(key))
        elif kind == b"zset":
            blobs.extend(admin.zrange(key, 0, -1))
    admin.close()
    assert len(blobs) > 10
    for key in s3.list_keys(""):
        if not key.endswith(".bin"):
            blobs.append(s3.get_bytes(key))
    for blob in blobs:
        for secret in secrets:
            assert secret not in blob, (secret, blob[:200])
    assert WORKER_PASSWORD not in redact_url(sec_settings.broker_url)


def test_a_wrong_s3_secret_is_one_clear_line_from_submit_results_and_the_worker(
        model: str, sec_settings: Settings, s3_server: Any, tmp_path: Path) -> None:
    wrong = s3_env(s3_server.endpoint, secret="not-the-secret-at-all")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    for args in (("submit", str(prompts), "--model", model), ("results", "never-seen", "--download", str(tmp_path))):
        done = run_cli(*args, settings=sec_settings, env=wrong, timeout=180)
        assert done.returncode == 3, (args, done.stderr)
        assert "Traceback" not in done.stderr and "not-the-secret" not in done.stderr
        assert "access denied" in done.stderr and "AWS_SECRET_ACCESS_KEY" in done.stderr, done.stderr
    bad = WorkerProcess(sec_settings, ["generate.wrong-secret"], tmp_path / "bad.log", extra_env=wrong).start()
    try:
        summary = submit(["a cat"], model=model, steps=2, queue="generate.wrong-secret",
                         settings=sec_settings).wait(timeout=300)
    finally:
        bad.stop()
    assert summary.failed == 1
    error = summary.items[0].error or ""
    assert "access denied" in error and "credentials" in error and "not-the-secret" not in error, error
    assert "Traceback" not in error


def test_results_download_never_writes_outside_its_directory(model: str, sec_settings: Settings, s3: S3Storage,
                                                             tmp_path: Path) -> None:
    handle = submit(["escape artist"], model=model, steps=2, seed=8, settings=sec_settings, batch_id="crafted")
    handle.wait(timeout=300)
    manifest = s3.get_json(keys.batch_manifest_key("crafted"))
    good = manifest["items"][0]
    # Crafted entries: uris and prompts that point outside, an absurd index; and a trap link in the target.
    good["uri"] = "file:///etc/passwd"
    manifest["items"].append({**good, "index": 10**12, "uri": "../../../../tmp/evil.png"})
    s3.put_json(keys.batch_manifest_key("crafted"), manifest)
    admin_progress = redis.Redis.from_url(sec_settings.broker_url)
    admin_progress.delete(*[f"darkroom:batch:crafted:{p}" for p in ("meta", "items", "status")])
    admin_progress.close()
    target = tmp_path / "out"
    target.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"untouched")
    (target / "00000.png").symlink_to(outside)
    done = run_cli("results", "crafted", "--download", str(target), settings=sec_settings,
                   env=s3_env(s3.endpoint))
    assert "Traceback" not in done.stderr, done.stderr
    assert outside.read_bytes() == b"untouched"
    assert not (target / "00000.png").is_symlink() and (target / "00000.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in target.iterdir()) == ["00000.png"]
    assert not Path("/tmp/evil.png").exists()
    assert "skipped item 1000000000000" in done.stderr
    # A damaged manifest is one line, not a traceback.
    manifest["items"].append({**good, "index": "../../x"})
    s3.put_json(keys.batch_manifest_key("crafted"), manifest)
    done = run_cli("results", "crafted", settings=sec_settings, env=s3_env(s3.endpoint))
    assert done.returncode == 2 and "malformed" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("name", ["../etc", "a/b", "/abs", "..", "x\n", "tab\there", "nul\x00", "C:\\win", ".dot",
                                  "", "é" * 3])
def test_user_supplied_names_that_could_escape_a_key_are_rejected(name: str, sec_settings: Settings,
                                                                   tmp_path: Path) -> None:
    for kind in ("batch", "model"):
        with pytest.raises(ValueError, match=f"invalid {kind} name"):
            keys.check_name(kind, name)
    with pytest.raises(InvalidRequest) as info:
        submit(["a cat"], model="guarded", batch_id=name, settings=sec_settings)
    assert info.value.field == "batch_id"
    try:  # whatever the key's last part, a download lands directly in its folder or nowhere
        assert keys.download_path(tmp_path, f"images/b/{name}").parent == tmp_path.resolve()
    except ValueError:
        pass
    if "\x00" not in name:
        done = run_cli("results", name or "''", settings=sec_settings)
        assert done.returncode == 2 and "invalid batch name" in done.stderr and "Traceback" not in done.stderr


def test_rediss_urls_carry_their_tls_options_to_kombu_and_redis_py() -> None:
    url = "rediss://darkroom-worker:pw@redis.internal:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem"
    settings = Settings(broker_url=url)
    app = make_app(settings)
    assert app.conf.broker_use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert app.conf.redis_backend_use_ssl == app.conf.broker_use_ssl
    with app.connection_for_write() as conn:
        assert conn.as_uri().startswith("rediss://")
        assert conn.ssl == app.conf.broker_use_ssl
    app.close()
    pool = redis.ConnectionPool.from_url(url)
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ca.pem"
    assert redact_url(url).startswith("rediss://darkroom-worker:***@")
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        make_app(Settings(broker_url=url.replace("required", "sometimes")))
