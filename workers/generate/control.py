"""The control-image step of a ControlNet job: fetch the image, annotate it once (cached in storage), check it.

An annotation is keyed by (control image digest, annotator, annotator settings) under controls/annotated/, so one
control image is annotated once per batch (indeed once ever), not once per item: the first item annotates it
under a short Redis lock while the other workers wait for the result; every later item reads the cached PNG.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np

from storage import ObjectNotFound, keys
from tasks.errors import InvalidRequest
from tasks.schemas import GenerateJob
from workers.runtime.context import WorkerRuntime

log = logging.getLogger(__name__)
LOCK_SECONDS = 300
_ANNOTATORS: dict[tuple[str, str], Any] = {}


def control_inputs(job: GenerateJob, runtime: WorkerRuntime, pipeline: Any) -> dict[str, Any]:
    """The keyword arguments a pipeline's generate() takes for this job's control image (none for SD)."""
    if getattr(pipeline, "family", "sd") != "controlnet":
        if job.control_image is not None or job.annotator is not None:
            raise InvalidRequest(f"model {job.model!r} is not a ControlNet model and takes no control image",
                                 field="control_image")
        return {}
    if job.control_image is None:
        raise InvalidRequest(f"model {job.model!r} is a ControlNet model and needs a control image",
                             field="control_image")
    image = control_image(job, runtime)
    if image.shape[:2] != (job.height, job.width):
        raise InvalidRequest(f"the control image is {image.shape[1]}x{image.shape[0]}, the job asks for "
                             f"{job.width}x{job.height}", field="control_image")
    return {"control_image": image, "controlnet_scale": job.controlnet_scale}


def control_image(job: GenerateJob, runtime: WorkerRuntime) -> np.ndarray:
    """The job's control image as RGB uint8, annotated first if the job names an annotator."""
    from workers.pipelines.annotators import AnnotatorUnavailable, settings_digest

    try:
        digest = keys.control_digest_of(job.control_image or "")
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="control_image") from None
    storage = runtime.storage
    if job.annotator is None:
        return _read(storage, keys.control_image_key(digest))
    try:
        key = keys.annotation_key(digest, job.annotator, settings_digest(job.annotator))
    except AnnotatorUnavailable as exc:
        raise InvalidRequest(str(exc), field="annotator") from None
    if storage.exists(key):
        return _read(storage, key)
    lock_name = f"darkroom:annotating:{key}"
    client = runtime.progress.client
    deadline = time.monotonic() + LOCK_SECONDS
    # One worker annotates; the others wait for its result (or take over if it dies and the lock expires).
    while not client.set(lock_name, "1", nx=True, ex=LOCK_SECONDS):
        if storage.exists(key):
            return _read(storage, key)
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    try:
        if storage.exists(key):  # finished while we took the lock
            return _read(storage, key)
        source = _read(storage, keys.control_image_key(digest))
        log.info("annotating control image %s with %s", digest[:12], job.annotator)
        try:
            annotated = annotators(runtime)(job.annotator, source)
        except AnnotatorUnavailable as exc:
            raise InvalidRequest(str(exc), field="annotator") from None
        storage.put_bytes(key, _png(annotated), content_type="image/png")
        return annotated
    finally:
        client.delete(lock_name)


def annotators(runtime: WorkerRuntime) -> Any:
    """The worker process's warm annotators (OpenPose compiled on the worker's device)."""
    from workers.pipelines.annotators import Annotators, weights_dir

    cache = runtime.settings.cache_dir
    slot = (runtime.device, str(cache))
    if slot not in _ANNOTATORS:
        _ANNOTATORS[slot] = Annotators(folder=weights_dir(cache), ir_cache=cache / "annotators-ir",
                                       device=runtime.device, core=runtime.pool.core)
    return _ANNOTATORS[slot]


def _read(storage: Any, key: str) -> np.ndarray:
    from PIL import Image

    try:
        data = storage.get_bytes(key)
    except ObjectNotFound:
        raise InvalidRequest(f"control image {key} is not in storage (submit it again)",
                             field="control_image") from None
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()
