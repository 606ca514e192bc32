"""Helpers of the fault suite: a small farm of real workers with test-only faults, and the batch checks."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil

from broker.settings import Settings
from darkroom import BatchHandle, submit
from storage import Storage, keys
from testkit.fleet import WorkerProcess

# Every scenario renders these prompts with this batch seed: item i always has the same seed and prompt, so its
# image must be byte-identical to the undisturbed reference run, whatever happened on the way.
PROMPTS = [f"a lighthouse on a cliff, variation {i}" for i in range(8)]
SEED = 1234
RENDER = {"steps": 4, "width": 64, "height": 64}


@dataclass
class Farm:
    """Workers for one scenario: each on the scenario's own queue, stopped (and killed if need be) at the end."""

    settings: Settings
    queue: str
    logs: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    @property
    def fault_log(self) -> Path:
        return self.logs / f"{self.queue}.unet.log"

    def start(self, name: str, *, faults: str = "", settings: Settings | None = None,
              env: dict[str, str] | None = None) -> WorkerProcess:
        extra = {"DARKROOM_FAULT_LOG": str(self.fault_log), **(env or {})}
        if faults:
            extra["DARKROOM_FAULT_INJECT"] = faults
        worker = WorkerProcess(settings or self.settings, [self.queue], self.logs / f"{self.queue}-{name}.log",
                               extra_env=extra)
        self.workers.append(worker)
        return worker.start()

    def submit(self, prompts: list[str] | None = None, **options: Any) -> BatchHandle:
        return submit(prompts or PROMPTS, model="tiny", seed=SEED, queue=self.queue, settings=self.settings,
                      **{**RENDER, **options})

    def stop(self) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.stop(timeout=60)

    def logs_text(self) -> str:
        return "\n".join(w.log_path.read_text(errors="replace") for w in self.workers if w.log_path.exists())


@contextmanager
def farm(settings: Settings, queue: str, logs: Path, **changes: Any) -> Iterator[Farm]:
    f = Farm(replace(settings, **changes) if changes else settings, queue, logs)
    try:
        yield f
    finally:
        f.stop()


@dataclass(frozen=True)
class Step:
    pid: int
    item: str
    step: int
    at: float


def unet_steps(log: Path) -> list[Step]:
    """The fault log: one line per UNet forward of each job (pid, batch.index, step, time)."""
    if not log.exists():
        return []
    steps = []
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            steps.append(Step(int(parts[0]), parts[1], int(parts[2]), float(parts[3])))
    return steps


def wait_for(condition: Callable[[], Any], *, timeout: float, what: str, poll: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def mid_unet(farm: Farm, batch_id: str, *, min_step: int = 2, pids: set[int] | None = None,
             warm: bool = False, timeout: float = 180) -> Step:
    """Wait until some process is inside an item's UNet loop (at `min_step` or later). `warm`: only in a process
    that already rendered another item, so the job was delivered seconds ago (not while its model loaded)."""
    def found() -> Step | None:
        steps = [s for s in unet_steps(farm.fault_log) if pids is None or s.pid in pids]
        latest = {s.pid: s for s in steps if s.item.startswith(batch_id + ".")}  # what each process does now
        for s in latest.values():
            if s.step >= min_step and (not warm or any(o.pid == s.pid and o.item != s.item for o in steps)):
                return s
        return None

    return wait_for(found, timeout=timeout, what=f"a UNet loop of batch {batch_id} at step {min_step}")


def pool_children(worker: WorkerProcess) -> set[int]:
    assert worker.process is not None
    try:
        return {c.pid for c in psutil.Process(worker.process.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def kill_group(worker: WorkerProcess) -> None:
    """SIGKILL the whole worker: main process and pool, as a machine crash or the OOM killer would."""
    assert worker.process is not None
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait()


def overlapping_runs(steps: list[Step]) -> list[str]:
    """Items whose UNet loops ran in two processes at the same time (a run: first to last step of one pid)."""
    spans: dict[str, dict[int, tuple[float, float]]] = {}
    for s in steps:
        lo, hi = spans.setdefault(s.item, {}).get(s.pid, (s.at, s.at))
        spans[s.item][s.pid] = (min(lo, s.at), max(hi, s.at))
    bad = []
    for item, runs in spans.items():
        ordered = sorted(runs.values())
        if any(b[0] < a[1] for a, b in zip(ordered, ordered[1:], strict=False)):
            bad.append(item)
    return bad


def check_batch(storage: Storage, batch_id: str, reference: dict[int, bytes], *, state: str = "completed",
                failed: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Every item has exactly one manifest entry and one image, byte-identical to the reference; clear end state."""
    manifest = storage.get_json(keys.batch_manifest_key(batch_id))
    n = manifest["total"]
    indices = [item["index"] for item in manifest["items"]]
    assert sorted(indices) == list(range(n)), f"manifest entries {sorted(indices)} for {n} items"
    assert manifest["state"] == state, manifest["state"]
    assert manifest["failed"] == len(failed) and manifest["done"] == n - len(failed)
    images = [k for k in storage.list_keys(f"images/{batch_id}/") if k.endswith(".png")]
    assert sorted(images) == sorted(keys.image_key(batch_id, i) for i in range(n) if i not in failed)
    for item in manifest["items"]:
        i = item["index"]
        if i in failed:
            assert item["status"] == "failed" and item["error"]
            continue
        assert item["status"] == "done", item
        assert storage.get_bytes(keys.image_key(batch_id, i)) == reference[i], f"item {i} differs from reference"
        assert storage.exists(keys.item_record_key(batch_id, i))
    return manifest
