"""Image-to-image init images on the producer's side: checked, normalised, uploaded once, referenced by URI.

Rules (README "Model families"):
- `--init-image PATH` (or an `init_image` column, relative to the prompts file's folder) makes an item
  image-to-image; `--strength` (or a `strength` column) in (0, 1] says how much of it to redraw (default 0.8),
  and int(steps * strength) must be at least 1 step.
- Only SD 1.x models (family "sd") take an init image (tasks/families.py).
- The init image is the output size: an item that sets no width/height takes its size; one that sets a
  different size is refused (no silent resizing). Sides must be multiples of 8. Any 8-bit mode is converted
  to RGB; 16-bit and float images are refused.
- Storage: the RGB image as PNG under inputs/<sha256 of the file>.png, uploaded once per distinct file.
Nothing here imports torch, diffusers or openvino.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darkroom.prompts import PromptLine
from darkroom.user_images import UserImage, read_output_sized_image, upload_user_images
from storage import Storage, keys
from tasks.errors import InvalidRequest
from tasks.families import COMMON_DEFAULTS
from tasks.request import GenerationRequest


def resolve_init_images(lines: Sequence[PromptLine], request: GenerationRequest, storage: Storage,
                        base_dir: Path | None) -> dict[int, dict[str, Any]]:
    """Per prompt line that is image-to-image, its init image's URI and the size it implies (the family's
    check_request has refused init images for other families). Every problem names the field and the line;
    nothing is uploaded unless every line is valid."""
    read: dict[Path, UserImage] = {}
    fields: dict[int, dict[str, Any]] = {}
    for pl in lines:
        given = request.given(pl.item)
        if given["init_image"] is None:
            if given["strength"] is not None:
                raise InvalidRequest("a strength without an init image (give --init-image or an init_image "
                                     "column)", field="strength", line=pl.line)
            continue
        image = read_output_sized_image(str(given["init_image"]), from_column=pl.item.init_image is not None,
                                        base_dir=base_dir, read=read, width=given["width"], height=given["height"],
                                        field="init_image", line=pl.line, what="an init image")
        strength = COMMON_DEFAULTS["strength"] if given["strength"] is None else given["strength"]
        steps = given["steps"] or COMMON_DEFAULTS["steps"]
        if min(int(steps * strength), steps) < 1:
            raise InvalidRequest(f"strength {strength} with {steps} steps leaves no denoising step "
                                 "(int(steps * strength) must be at least 1)", field="strength", line=pl.line)
        fields[pl.line] = {"init_image": image.digest, "strength": strength, "width": image.width,
                          "height": image.height}
    # Upload once per distinct file (content-addressed: an existing key already holds these bytes).
    uris = upload_user_images(read.values(), storage, keys.init_image_key)
    for entry in fields.values():
        entry["init_image"] = uris[entry["init_image"]]
    return fields
