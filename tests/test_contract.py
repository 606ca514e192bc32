"""The producer's contract: light to import, JSON-only settings, deterministic seeds."""

from __future__ import annotations

import subprocess
import sys

from broker.app import make_app
from broker.settings import Settings, redact_url
from tasks.seeds import derive_seed

HEAVY = ("torch", "diffusers", "openvino", "nncf", "transformers")


def test_importing_tasks_imports_no_worker_side_package() -> None:
    code = (
        "import sys, tasks, darkroom.submit, storage, broker.app, broker.progress;"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing tasks pulled in: {out.stdout.strip()}"


def test_app_is_json_only_and_reliable_by_default() -> None:
    app = make_app(Settings(broker_url="redis://127.0.0.1:1/0"))
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.result_accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    # Short enough that a dead worker's job comes back within minutes; safe because of the item lock.
    assert 60 <= conf.broker_transport_options["visibility_timeout"] <= 900
    assert conf.broker_transport_options["unacked_restore_interval"] <= 30


def test_item_seeds_are_deterministic_and_distinct() -> None:
    seeds = [derive_seed(42, i) for i in range(1000)]
    assert seeds == [derive_seed(42, i) for i in range(1000)]
    assert len(set(seeds)) == 1000
    assert derive_seed(43, 0) != derive_seed(42, 0)
    assert all(0 <= s < 2**32 for s in seeds)


def test_urls_are_redacted() -> None:
    assert redact_url("redis://:hunter2@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert redact_url("redis://user:hunter2@host/0") == "redis://user:***@host/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
