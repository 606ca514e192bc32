"""Image-to-image on the worker: the job's init image read from storage, as the pipeline's inputs."""

from __future__ import annotations

from typing import Any

from storage import ObjectNotFound, Storage, keys
from tasks.errors import InvalidRequest
from tasks.schemas import GenerateJob


def img2img_inputs(job: GenerateJob, storage: Storage) -> dict[str, Any]:
    """{} for text-to-image; else the decoded init image and the strength, for OVStableDiffusionImg2Img."""
    if job.init_image is None:
        return {}
    from workers.pipelines.img2img import decode_init_image

    try:
        key = keys.init_image_key(keys.init_image_digest_of(job.init_image))
        data = storage.get_bytes(key)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="init_image") from None
    except ObjectNotFound:
        raise InvalidRequest(f"the init image {job.init_image} is not in storage (deleted, or another storage?)",
                             field="init_image") from None
    try:
        image = decode_init_image(data, width=job.width, height=job.height)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="init_image") from None
    return {"init_image": image, "strength": job.strength}


def img2img_metadata(job: GenerateJob) -> dict[str, object]:
    """PNG text fields that say which init image and strength an image-to-image output came from."""
    if job.init_image is None:
        return {}
    return {"init_image": job.init_image.rsplit("/", 1)[-1], "strength": job.strength}
