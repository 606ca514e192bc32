"""Webhooks on real parts: a real Redis, a real `darkroom worker` rendering the tiny model on OpenVINO, and a real
HTTP server on 127.0.0.1 (http.server in a thread) that receives the POSTs, checks their signatures with the secret
and answers as each test scripts it. Plus unit tests of the URL checks and of signing."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from broker.app import task_sender
from broker.manifest import write_manifest
from broker.progress import BatchProgress
from broker.settings import Settings
from broker.webhooks import (
    SIGNATURE_HEADER,
    WebhookRefused,
    check_url,
    post,
    sign,
    verify,
    webhook_status,
)
from darkroom import submit
from darkroom.cli import main
from darkroom.steering import cancel
from storage import keys, open_storage
from tasks.errors import InvalidRequest
from tasks.request import GenerationRequest
from testkit.fleet import WorkerProcess, convert_with_worker, run_cli
from tests.conftest import queue_settings_for, redis_db_url
from tests.faults import PROMPTS, RENDER, SEED, wait_for

SECRET = "whsec-test-secret"
BACKOFF = 0.5  # seconds before the 2nd attempt; 1.0 before the 3rd
QUEUE = "hooks"
WORKER_ENV = {"DARKROOM_WEBHOOK_SECRET": SECRET, "DARKROOM_WEBHOOK_BACKOFF": str(BACKOFF),
              "DARKROOM_WEBHOOK_RETRY_FOR": "60", "DARKROOM_FAULT_INJECT": "invalid-on-prompt:BROKEN"}


# ---------------------------------------------------------------------------------------------------- receiver


@dataclass
class Received:
    at: float
    path: str
    body: bytes
    signature: str | None

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """What the server got, and the statuses it answers per path (after the script runs out: 200)."""

    url: str
    got: list[Received] = field(default_factory=list)
    script: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path == path]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with state.lock:
                state.got.append(Received(time.time(), self.path, body, self.headers.get(SIGNATURE_HEADER)))
                script = state.script.get(self.path, [])
                code = script.pop(0) if script else 200
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------------- services


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("hooks"), redis_db_url(redis_server, 6))


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hooks-logs")


@pytest.fixture(scope="module")
def model(settings: Settings, logs: Path, tiny_sd_dir: Path) -> str:
    return convert_with_worker(settings, tiny_sd_dir, "tiny", logs / "convert.log")


@pytest.fixture(scope="module")
def worker(settings: Settings, logs: Path, model: str) -> Iterator[WorkerProcess]:
    """One warm worker on queue `hooks` (and so `hooks.high`, where webhook deliveries go)."""
    w = WorkerProcess(settings, [QUEUE], logs / "hooks-worker.log", extra_env=WORKER_ENV).start()
    yield w
    w.stop(timeout=60)


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(settings.broker_url)
    yield c
    c.close()


def _submit(settings: Settings, prompts: list[str], url: str, **options: Any) -> Any:
    return submit(prompts, model="tiny", seed=SEED, queue=QUEUE, settings=settings, webhook=url,
                  **{**RENDER, **options})


def _events(receiver: Receiver, path: str, count: int, timeout: float = 60) -> list[Received]:
    return wait_for(lambda: (got := receiver.of(path)) and len(got) >= count and got, timeout=timeout,
                    what=f"{count} POST(s) to {path}")


def _status(settings: Settings, batch_id: str) -> dict[str, dict[str, Any]]:
    progress = BatchProgress(settings.broker_url)
    try:
        return webhook_status(progress.client, batch_id)
    finally:
        progress.close()


# ---------------------------------------------------------------------------------------------------- real parts


def test_completed_batch_event_is_signed_retried_on_5xx_with_backoff_and_shown_delivered(
        settings: Settings, worker: WorkerProcess, receiver: Receiver, client: redis.Redis) -> None:
    receiver.script["/flaky"] = [500, 500]
    handle = _submit(settings, PROMPTS[:2], receiver.url + "/flaky", batch_id="hook-ok")
    assert handle.wait(timeout=120).state == "completed"
    got = _events(receiver, "/flaky", 3)
    wait_for(lambda: _status(settings, handle.batch_id).get("batch.completed", {}).get("status") == "delivered",
             timeout=30, what="the delivery to be recorded")
    # Three attempts of one event, the same body each time, each signed with the secret.
    assert len(got) == 3
    assert {r.body for r in got} == {got[0].body}
    for r in got:
        assert r.signature and verify(SECRET, r.signature, r.body), r.signature
        assert not verify("another-secret", r.signature, r.body)
    event = got[0].event
    assert event["id"] == "hook-ok:batch.completed:0" and event["type"] == "batch.completed"
    assert event["data"].pop("manifest").endswith(keys.batch_manifest_key(handle.batch_id))
    assert event["data"] == {"batch_id": "hook-ok", "state": "completed", "total": 2, "done": 2, "failed": 0,
                             "cancelled": 0}
    manifest = open_storage(settings.storage_url).get_json(keys.batch_manifest_key(handle.batch_id))
    assert event["created"] == manifest["finished"]
    # Exponential backoff: BACKOFF before the 2nd attempt, twice that before the 3rd (plus queueing time).
    gaps = [b.at - a.at for a, b in zip(got, got[1:], strict=False)]
    assert BACKOFF <= gaps[0] < BACKOFF + 5 and 2 * BACKOFF <= gaps[1] < 2 * BACKOFF + 5, gaps
    status = _status(settings, handle.batch_id)["batch.completed"]
    assert (status["status"], status["attempts"], status["last_error"]) == ("delivered", 3, "")
    # The status command shows it, as text and as JSON.
    shown = run_cli("status", handle.batch_id, settings=settings)
    assert "webhook batch.completed: delivered after 3 attempt(s)" in shown.stdout, shown.stdout + shown.stderr
    as_json = json.loads(run_cli("status", handle.batch_id, "--json", settings=settings).stdout)
    assert as_json["webhooks"]["batch.completed"]["attempts"] == 3
    # The batch finished again (a late duplicate rewrites its manifest): the same event is not sent again.
    progress = BatchProgress(settings.broker_url)
    write_manifest(progress, open_storage(settings.storage_url), handle.batch_id, send=task_sender(settings))
    progress.close()
    time.sleep(3)
    assert len(receiver.of("/flaky")) == 3
    # Only the batch event was asked for (the default): no item.done.
    assert {r.event["type"] for r in got} == {"batch.completed"}


def test_a_batch_with_failures_sends_batch_failed_and_item_done_when_asked(
        settings: Settings, worker: WorkerProcess, receiver: Receiver) -> None:
    handle = _submit(settings, [PROMPTS[0], "BROKEN on purpose", PROMPTS[1]], receiver.url + "/mixed",
                     batch_id="hook-mixed", webhook_events="item.done,batch.failed")
    summary = handle.wait(timeout=120)
    assert (summary.state, summary.done, summary.failed) == ("completed_with_failures", 2, 1)
    got = _events(receiver, "/mixed", 3)
    time.sleep(1)
    events = sorted((r.event for r in receiver.of("/mixed")), key=lambda e: e["id"])
    assert [e["id"] for e in events] == ["hook-mixed:batch.failed:0", "hook-mixed:item.done:0:0",
                                         "hook-mixed:item.done:2:0"]
    failed = events[0]
    assert failed["type"] == "batch.failed"
    assert {k: failed["data"][k] for k in ("state", "total", "done", "failed")} == {
        "state": "completed_with_failures", "total": 3, "done": 2, "failed": 1}
    assert all(verify(SECRET, r.signature or "", r.body) for r in got)
    assert {e["data"]["index"] for e in events[1:]} == {0, 2}
    status = _status(settings, handle.batch_id)
    assert status["batch.failed"]["status"] == "delivered" and status["batch.failed"]["attempts"] == 1


def test_a_cancelled_batch_sends_batch_cancelled_from_its_own_high_queue(
        settings: Settings, model: str, logs: Path, receiver: Receiver, client: redis.Redis) -> None:
    held = "hooks-held"  # no worker yet: the producer's cancel finishes the batch and writes the manifest
    handle = submit(PROMPTS[:3], model=model, seed=SEED, queue=held, batch_id="hook-cancel", settings=settings,
                    webhook=receiver.url + "/cancel", **RENDER)
    assert cancel(handle.batch_id, settings=settings).state == "cancelled"
    # The delivery waits in the batch's own high priority queue, for whichever worker serves the batch's queue.
    assert client.llen(f"{held}.high") == 1
    w = WorkerProcess(settings, [held], logs / "held-worker.log", extra_env=WORKER_ENV).start()
    try:
        got = _events(receiver, "/cancel", 1)
    finally:
        w.stop(timeout=60)
    event = got[0].event
    assert (event["id"], event["type"]) == ("hook-cancel:batch.cancelled:0", "batch.cancelled")
    assert event["data"]["cancelled"] == 3 and event["data"]["state"] == "cancelled"
    assert verify(SECRET, got[0].signature or "", got[0].body)


def test_a_4xx_is_not_retried_and_never_fails_the_batch(
        settings: Settings, worker: WorkerProcess, receiver: Receiver) -> None:
    receiver.script["/gone"] = [410]
    handle = _submit(settings, PROMPTS[:1], receiver.url + "/gone", batch_id="hook-410")
    assert handle.wait(timeout=120).state == "completed"
    _events(receiver, "/gone", 1)
    wait_for(lambda: _status(settings, handle.batch_id).get("batch.completed", {}).get("status") == "failed",
             timeout=30, what="the failed delivery to be recorded")
    time.sleep(2)
    assert len(receiver.of("/gone")) == 1
    status = _status(settings, handle.batch_id)["batch.completed"]
    assert (status["attempts"], status["last_error"]) == (1, "HTTP 410")
    assert handle.summary().state == "completed"


# ---------------------------------------------------------------------------------------------------- units


def test_submit_refuses_other_schemes_and_metadata_hosts_with_one_line(capsys: pytest.CaptureFixture[str],
                                                                       tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    for url in ("ftp://example.com/hook", "http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/x"):
        code = main(["--broker-url", "redis://127.0.0.1:1/0", "submit", str(prompts), "--model", "m",
                     "--webhook", url])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "webhook" in err[0], (url, err)
    # The producer's default webhook (no --webhook) is checked the same way.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DARKROOM_WEBHOOK_URL", "http://169.254.169.254/")
        code = main(["--broker-url", "redis://127.0.0.1:1/0", "submit", str(prompts), "--model", "m"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "webhook" in err[0], err


def test_url_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WebhookRefused, match="only http"):
        check_url("ftp://example.com/")
    with pytest.raises(WebhookRefused, match="link-local or cloud metadata"):
        check_url("http://169.254.169.254/")
    with pytest.raises(WebhookRefused, match="link-local"):
        check_url("http://[::ffff:169.254.169.254]/")
    assert check_url("http://127.0.0.1:8080/hook")  # loopback is allowed
    monkeypatch.setenv("DARKROOM_WEBHOOK_ALLOW", "metadata.internal, 169.254.169.254")
    assert check_url("http://169.254.169.254/")
    # A name that resolves to the metadata address (DNS can change after submit): refused at delivery too.
    real = socket.getaddrinfo

    def rebinding(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "hooks.example.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    with pytest.raises(WebhookRefused):
        check_url("http://hooks.example.test/")
    outcome = post("http://hooks.example.test/", b"{}", secret=None)
    assert not outcome.delivered and not outcome.retryable and "metadata" in outcome.error


def test_request_fields() -> None:
    request = GenerationRequest.build(["a"], model="m", webhook="https://example.com/h",
                                      webhook_events="item.done,batch.completed")
    assert request.webhook_events == ("item.done", "batch.completed")
    assert GenerationRequest.build(["a"], model="m").webhook_events == (
        "batch.completed", "batch.failed", "batch.cancelled")
    with pytest.raises(InvalidRequest) as info:
        GenerationRequest.build(["a"], model="m", webhook_events="batch.exploded")
    assert info.value.field == "webhook_events"
    with pytest.raises(InvalidRequest) as info:
        GenerationRequest.build(["a"], model="m", webhook="file:///etc/passwd")
    assert info.value.field == "webhook"


def test_sign_and_verify() -> None:
    body = b'{"id":"b:batch.completed:0"}'
    now = int(time.time())
    header = sign(SECRET, now, body)
    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body)
    assert not verify(SECRET, header, body + b" ")  # tampered body
    assert not verify("wrong", header, body)
    assert not verify(SECRET, sign(SECRET, now - 3600, body), body)  # replayed an hour later
    assert not verify(SECRET, "garbage", body)
