"""`darkroom gallery` of a batch a real worker rendered, looked at in headless Chromium; local and S3 storage."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from broker.progress import BatchProgress
from broker.settings import Settings
from darkroom import BatchHandle, BatchSummary, submit, submit_convert
from darkroom.submit import send_jobs
from storage import keys, open_storage
from storage.s3 import S3Storage
from tasks.schemas import GenerateJob
from testkit.fleet import REPO, WorkerProcess
from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, queue_settings_for, redis_db_url, s3_env

FAST = {"steps": 3, "width": 64, "height": 64}
SCRIPT_PROMPT = "a cat <script>window.__pwned = 1</script>"
PROMPTS = [SCRIPT_PROMPT, 'a "dog" & <b>bold</b> <img src=x onerror="window.__pwned = 2">', "a plain bird"]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
# FIELD-NOTES: what headless Chromium needs on these machines (Playwright gives it a fresh profile directory).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@contextmanager
def chromium() -> Iterator[Any]:
    """A page in the system's headless Chromium (never a browser that Playwright downloads)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def gallery(settings: Settings, *args: str, cwd: Path = REPO, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **settings.as_env(), "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "darkroom", "gallery", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("gallery"), redis_db_url(redis_server, 13))


@pytest.fixture(scope="module")
def batch(settings: Settings, tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchSummary]:
    """Three rendered images and one failed item, rendered by a real worker into local storage."""
    worker = WorkerProcess(settings, ["generate.CPU", "convert"], tmp_path_factory.mktemp("logs") / "worker.log")
    try:
        worker.start(timeout=300)
        outcome = submit_convert(str(tiny_sd_dir), name="tiny", weight_format="fp32",
                                 settings=settings).get(timeout=600)
        assert outcome["status"] == "done", outcome
        handle = submit(PROMPTS, model="tiny", seed=8, batch_id="shown", settings=settings, **FAST)
        handle.wait(timeout=600)
        # As in test_queue: a fourth item whose artifact does not exist.
        BatchProgress(settings.broker_url).client.hset("darkroom:batch:shown:meta", "total", 4)
        bad = GenerateJob(batch_id="shown", index=3, prompt="<i>lost</i>", seed=4, guidance=7.5, scheduler="pndm",
                          model="tiny", precision="fp32", fingerprint="0" * 16, **FAST)
        send_jobs([bad], settings, queue="generate.CPU")
        summary = BatchHandle("shown", 4, settings).wait(timeout=300)
        assert (summary.done, summary.failed) == (3, 1)
        yield summary
    finally:
        worker.stop()


def test_the_gallery_shows_every_image_and_prompts_as_text(batch: BatchSummary, settings: Settings,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "gallery"
    done = gallery(settings, batch.batch_id, "--out", str(out))
    assert done.returncode == 0, done.stderr
    index = out / "index.html"
    assert done.stdout.strip() == str(index)
    with Image.open(out / "contact-sheet.png") as sheet:
        assert sheet.format == "PNG" and sheet.size[0] > 0
    page_source = index.read_text()
    assert "<script" not in page_source and "&lt;script&gt;" in page_source
    ARTIFACTS.mkdir(exist_ok=True)
    with chromium() as page:
        page.goto(index.as_uri())
        page.wait_for_load_state("load")
        page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)
        # Every thumbnail loaded (none broken), and each links to its full image, which loads too.
        sizes = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth])")
        assert sizes == [[True, 64]] * 3
        links = page.eval_on_selector_all("figure a", "links => links.map(a => a.href)")
        assert len(links) == 3
        # The prompts are shown as text; nothing in them ran or became an element.
        assert page.evaluate("window.__pwned") is None
        assert page.locator("script").count() == 0
        assert page.locator("figcaption b, figcaption img, figcaption i").count() == 0
        shown = page.locator(".prompt").all_inner_texts()
        assert shown == [*PROMPTS, "<i>lost</i>"]
        first = page.locator("#item-0")
        for text in ("seed", str(batch.items[0].seed), "tiny", "fp32", "pndm", "steps", "3"):
            assert text in first.inner_text(), text
        assert "failed" in page.locator("#item-3").inner_text()
        page.goto(links[0])
        assert page.evaluate("document.images[0].naturalWidth") == 64


def test_without_out_it_writes_under_darkroom_data(batch: BatchSummary, settings: Settings, tmp_path: Path) -> None:
    done = gallery(settings, batch.batch_id, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "darkroom-data" / "gallery" / batch.batch_id
    assert (out / "index.html").is_file() and (out / "contact-sheet.png").is_file()
    assert sorted(p.name for p in (out / "thumbs").iterdir()) == ["00000.png", "00001.png", "00002.png"]


def test_with_s3_storage_the_images_are_downloaded_beside_the_page(batch: BatchSummary, settings: Settings,
                                                                   s3_server: Any, tmp_path: Path) -> None:
    # The worker's batch, copied as it is into a real S3 server; the progress stays in Redis.
    s3 = S3Storage("gallery", "dr", endpoint_url=s3_server.endpoint, access_key=S3_ACCESS_KEY,
                   secret_key=S3_SECRET_KEY)
    s3.ensure_bucket()
    local = open_storage(settings.storage_url)
    for key in local.list_keys(f"images/{batch.batch_id}/"):
        s3.put_bytes(key, local.get_bytes(key))
    s3_settings = Settings(broker_url=settings.broker_url, storage_url="s3://gallery/dr")
    out = tmp_path / "s3-gallery"
    done = gallery(s3_settings, batch.batch_id, "--out", str(out), env=s3_env(s3_server.endpoint))
    assert done.returncode == 0, done.stderr
    for item in batch.items:
        if item.status == "done":
            copy = out / keys.image_key(batch.batch_id, item.index)
            assert copy.read_bytes() == local.get_bytes(keys.image_key(batch.batch_id, item.index))
    html = (out / "index.html").read_text()
    assert f'href="images/{batch.batch_id}/00000.png"' in html
    with chromium() as page:
        page.goto((out / "index.html").as_uri())
        page.wait_for_load_state("load")
        assert page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)") == [64] * 3


def test_an_unknown_batch_is_one_clear_line(settings: Settings, tmp_path: Path) -> None:
    done = gallery(settings, "no-such-batch", "--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert "unknown batch 'no-such-batch'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()
