"""Real `darkroom worker` processes for the tests: started, awaited until they answer, stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.app import make_app
from broker.settings import Settings

if TYPE_CHECKING:
    import pytest

REPO = Path(__file__).resolve().parents[1]


@dataclass
class WorkerProcess:
    settings: Settings
    queues: list[str]
    log_path: Path
    device: str = "CPU"
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def nodename(self) -> str:
        assert self.process is not None
        return f"darkroom-{self.device}-{self.process.pid}@{socket.gethostname()}"

    def start(self, *, timeout: float = 120) -> WorkerProcess:
        env = {**os.environ, **self.settings.as_env(), **self.extra_env, "PYTHONPATH": str(REPO)}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "darkroom", "worker", "--device", self.device,
             "--queues", ",".join(self.queues), "--loglevel", "INFO", *self.extra_args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
        )
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        app = make_app(self.settings)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log_tail()}")
                replies = app.control.ping(destination=[self.nodename], timeout=1.0)
                if replies:
                    return
            raise TimeoutError(f"worker {self.nodename} did not answer within {timeout} s:\n{self.log_tail()}")
        finally:
            app.close()

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, *, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextmanager
def running_worker(settings: Settings, queues: list[str], tmp_path_factory: pytest.TempPathFactory,
                   **options: Any) -> Iterator[WorkerProcess]:
    """A started worker on `queues`, logging to a fresh logs/w.log; stopped on leaving, even if it never answered.

    `options` are WorkerProcess's other fields (device, extra_env, extra_args).
    """
    process = WorkerProcess(settings, queues, tmp_path_factory.mktemp("logs") / "w.log", **options)
    try:
        yield process.start()
    finally:
        process.stop()


def convert_model(settings: Settings, source: str | Path, name: str, *, weight_format: str = "fp32",
                  timeout: float = 600) -> dict[str, Any]:
    """Convert `source` as model `name` through the queue and wait for it; the outcome, which must be done."""
    from darkroom import submit_convert

    outcome = submit_convert(str(source), name=name, weight_format=weight_format, settings=settings).get(
        timeout=timeout)
    assert outcome["status"] == "done", outcome
    return outcome


def convert_with_worker(settings: Settings, source: str | Path, name: str, log_path: Path) -> str:
    """Convert `source` as model `name` with a converter worker started for it and stopped after; the name."""
    worker = WorkerProcess(settings, ["convert"], log_path).start()
    try:
        convert_model(settings, source, name)
    finally:
        worker.stop()
    return name


def run_cli(*args: str, settings: Settings | None = None, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`darkroom ARGS` as a user runs it, in its own process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(settings.as_env() if settings else {}), **(env or {})}
    return subprocess.run([sys.executable, "-m", "darkroom", *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd or REPO, timeout=timeout)
