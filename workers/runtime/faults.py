"""TEST-ONLY fault injection for the fault suite (tests/test_faults.py). Off unless DARKROOM_FAULT_INJECT is set.

`DARKROOM_FAULT_INJECT` is a comma-separated list of faults:

- ``slow-unet:SECONDS``   sleep this long before every UNet forward (makes a job long enough to kill mid-loop);
- ``crash-on-prompt:TEXT`` SIGKILL the running process at the second UNet forward of any job whose prompt
  contains TEXT (a "poison" item that crashes its worker every time);
- ``invalid-on-prompt:TEXT`` raise InvalidRequest at the first UNet forward of any job whose prompt contains
  TEXT (an item this worker refuses: failed at once, never retried, not dead-lettered).

With `DARKROOM_FAULT_LOG` set, every UNet forward of a wrapped job appends one line
``<pid> <batch>.<index> <step> <unix time>`` to that file, so a test can see which process is inside which
UNet loop. Production workers never set these variables; nothing here runs unless they do.
"""

from __future__ import annotations

import copy
import os
import signal
import time
from typing import Any

from tasks.errors import InvalidRequest

ENV_FAULTS = "DARKROOM_FAULT_INJECT"
ENV_LOG = "DARKROOM_FAULT_LOG"
KINDS = ("slow-unet", "crash-on-prompt", "invalid-on-prompt")


def parse(spec: str) -> dict[str, str]:
    """`slow-unet:0.3,crash-on-prompt:X` -> {"slow-unet": "0.3", "crash-on-prompt": "X"}; ValueError if bad."""
    faults: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition(":")
        if not sep or name not in KINDS or not value:
            raise ValueError(f"{ENV_FAULTS}: unknown fault {part!r} (use slow-unet:SECONDS, crash-on-prompt:TEXT "
                             "or invalid-on-prompt:TEXT)")
        if name == "slow-unet":
            float(value)
        faults[name] = value
    return faults


def wrap(pipeline: Any, job: Any) -> Any:
    """The pipeline itself, or (only when a test asked for faults) a copy whose UNet calls inject them."""
    spec = os.environ.get(ENV_FAULTS, "")
    log = os.environ.get(ENV_LOG, "")
    if not spec and not log:
        return pipeline
    faults = parse(spec)
    wrapped = copy.copy(pipeline)  # shallow: same compiled models and lock, only `unet` is replaced
    wrapped.unet = _FaultyUNet(pipeline.unet, faults, f"{job.batch_id}.{job.index}", job.prompt, log)
    return wrapped


class _FaultyUNet:
    def __init__(self, unet: Any, faults: dict[str, str], item: str, prompt: str, log: str) -> None:
        self._unet, self._faults, self._item, self._prompt, self._log = unet, faults, item, prompt, log
        self._step = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._unet, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._step += 1
        if self._log:
            with open(self._log, "a") as fh:
                fh.write(f"{os.getpid()} {self._item} {self._step} {time.time():.3f}\n")
        if "slow-unet" in self._faults:
            time.sleep(float(self._faults["slow-unet"]))
        refused = self._faults.get("invalid-on-prompt")
        if refused and refused in self._prompt:
            raise InvalidRequest(f"injected fault: prompt contains {refused!r}", field="prompt")
        poison = self._faults.get("crash-on-prompt")
        if poison and poison in self._prompt and self._step == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return self._unet(*args, **kwargs)
