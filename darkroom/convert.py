"""Enqueue a conversion: a diffusers model (local folder or Hugging Face id) to OpenVINO IR in storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from broker.app import make_app
from broker.progress import BatchProgress
from broker.settings import Settings
from storage import keys
from tasks.errors import InvalidRequest
from tasks.names import CONVERT_QUEUE, CONVERT_TASK, FAMILIES
from tasks.schemas import ConvertJob


def submit_convert(source: str, *, name: str, weight_format: str = "fp16", settings: Settings | None = None,
                   make_default: bool = True, family: str | None = None) -> Any:
    """Enqueue a conversion job on the convert queue; returns its Celery AsyncResult.

    `family` None: the worker detects it from model_index.json; given, the model must be of that family.
    """
    settings = settings or Settings.from_env()
    if family is not None and family not in FAMILIES:
        raise InvalidRequest(f"unknown model family {family!r}; known families: {', '.join(FAMILIES)}",
                             field="family")
    try:
        keys.check_name("model", name)
        job = ConvertJob(name=name, source=str(source), weight_format=weight_format, make_default=make_default,
                         family=family)
    except ValueError as exc:
        raise InvalidRequest(str(exc).splitlines()[0], field="name") from None
    if Path(source).exists() and not (Path(source) / "model_index.json").exists():
        raise InvalidRequest(f"{source} is not a diffusers model folder (no model_index.json)", field="source")
    BatchProgress(settings.broker_url).ping()
    app = make_app(settings)
    return app.send_task(CONVERT_TASK, kwargs={"job": job.model_dump()}, queue=CONVERT_QUEUE)
