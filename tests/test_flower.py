"""`darkroom flower` on real parts: Redis, a real worker, a rendered batch, and headless Chromium signing in."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

from broker.embedded import free_port
from broker.settings import Settings
from darkroom import BatchSummary, submit, submit_convert
from darkroom.cli_ops import FLOWER_AUTH_ENV
from testkit.fleet import REPO, WorkerProcess
from tests.conftest import queue_settings_for, redis_db_url

USER, PASSWORD = "darkroom-admin", "flower-test-password"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# FIELD-NOTES: what headless Chromium needs on these machines (Playwright gives it a fresh profile directory).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def ops_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "darkroom", *args]


def ops_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FLOWER_AUTH_ENV}
    return {**env, **settings.as_env(), "PYTHONPATH": str(REPO), **extra}


@contextmanager
def chromium(**context: Any) -> Iterator[Any]:
    """A page in the system's headless Chromium (never a browser that Playwright downloads)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 900}, **context).new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("flower"), redis_db_url(redis_server, 11))


@pytest.fixture(scope="module")
def flower(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """`darkroom flower` on a free port of 127.0.0.1 (its default address); yields (url, pid)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("flower-logs") / "flower.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(ops_command("flower", "--port", str(port)),
                                   env=ops_env(settings, **{FLOWER_AUTH_ENV: f"{USER}:{PASSWORD}"}),
                                   stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _status(url + "/healthcheck") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"flower did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(settings, ["generate.CPU", "convert"], tmp_path_factory.mktemp("logs") / "worker.log")
    try:
        yield w.start(timeout=300)
    finally:
        w.stop()


@pytest.fixture(scope="module")
def batch(flower: tuple[str, int], worker: WorkerProcess, tiny_sd_dir: Path, settings: Settings) -> BatchSummary:
    # Flower knows tasks only from the events it receives: it runs before the batch is sent.
    outcome = submit_convert(str(tiny_sd_dir), name="tiny", weight_format="fp32", settings=settings).get(timeout=600)
    assert outcome["status"] == "done", outcome
    handle = submit(["a lighthouse", "a harbour", "a gull"], model="tiny", seed=3, steps=3, width=64, height=64,
                    settings=settings)
    summary = handle.wait(timeout=600)
    assert (summary.done, summary.failed) == (3, 0)
    return summary


def _status(url: str, auth: tuple[str, str] | None = None) -> int:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


@pytest.mark.parametrize(("auth", "message"), [
    (None, f"{FLOWER_AUTH_ENV} is not set"),
    ("", f"{FLOWER_AUTH_ENV} is not set"),
    ("admin", "must be user:password"),
    ("admin:hunter2,:nouser", "must be user:password"),
])
def test_flower_refuses_to_start_without_a_password(settings: Settings, auth: str | None, message: str) -> None:
    env = ops_env(settings) if auth is None else ops_env(settings, **{FLOWER_AUTH_ENV: auth})
    done = subprocess.run(ops_command("flower", "--port", str(free_port())), env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "hunter2" not in done.stderr


def test_a_taken_port_is_one_clear_line(flower: tuple[str, int], settings: Settings) -> None:
    taken = flower[0].rsplit(":", 1)[1]
    done = subprocess.run(ops_command("flower", "--port", taken), capture_output=True, text=True, timeout=120,
                          env=ops_env(settings, **{FLOWER_AUTH_ENV: f"{USER}:{PASSWORD}"}), cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"darkroom: error: cannot serve Flower on 127.0.0.1:{taken}: Address already in use"


def test_pages_and_api_need_the_password_and_flower_listens_on_loopback(flower: tuple[str, int]) -> None:
    url, pid = flower
    for path in ("/api/workers", "/api/tasks", "/workers", "/tasks"):
        assert _status(url + path) == 401, path
        assert _status(url + path, (USER, "wrong")) == 401, path
    assert _status(url + "/api/workers", (USER, PASSWORD)) == 200
    # Flower 2.2 serves these to anyone (FIELD-NOTES): why darkroom binds 127.0.0.1 unless told otherwise.
    assert _status(url + "/metrics") == 200
    assert _status(url + "/healthcheck") == 200
    port = int(url.rsplit(":", 1)[1])
    listening = {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}


def test_a_signed_in_browser_sees_the_worker_its_queue_and_the_batch(flower: tuple[str, int], worker: WorkerProcess,
                                                                     batch: BatchSummary) -> None:
    url, _ = flower
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium(http_credentials={"username": USER, "password": PASSWORD}) as page:
        # The workers page: our worker, online.
        page.goto(url + "/workers")
        row = page.locator("#workers-table tbody tr", has_text=worker.nodename)
        row.wait_for()
        assert "Online" in row.inner_text()
        page.screenshot(path=str(ARTIFACTS / "flower-workers.pipelines.png"), full_page=True)
        # Its page lists the queue it consumes.
        page.goto(f"{url}/worker/{worker.nodename}")
        page.locator("#worker-tab-queues").click()
        # Bootstrap fades the tab in: wait until it is drawn, for the screenshot.
        page.wait_for_function("getComputedStyle(document.querySelector('#tab-queues')).opacity === '1'")
        names = page.locator("#worker-queues tr td:first-child")
        names.first.wait_for()
        assert "generate.CPU" in names.all_inner_texts()
        page.screenshot(path=str(ARTIFACTS / "flower-worker-queues.png"), full_page=True)
        # The tasks page: every item of the batch, a darkroom.generate task that succeeded.
        page.goto(url + "/tasks")
        for item in batch.items:
            task_row = page.locator("#tasks-table tbody tr", has_text=f"{batch.batch_id}.{item.index}")
            task_row.wait_for()
            text = task_row.inner_text()
            assert "darkroom.generate" in text and "SUCCESS" in text, text
        page.screenshot(path=str(ARTIFACTS / "flower-tasks.png"), full_page=True)
