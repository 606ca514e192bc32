"""ControlNet control images on the producer's side: checked, normalised, uploaded once, referenced by URI.

Rules (README "Model families"; which family takes a control image is tasks/families.py's):
- Modes: RGB is taken as it is; L, LA, P, RGBA, CMYK and the like are converted to RGB (alpha is dropped,
  as diffusers' own `convert("RGB")` does). 16-bit and float images (I;16, I, F) are refused.
- Size: the control image is the output size. An item that sets no width/height takes the control image's
  size; one that sets a different size is refused (no silent resizing). Sides must be multiples of 8.
- Storage: the normalised image is stored as PNG under controls/<sha256 of the file>.png, so the same file
  is uploaded once whatever the number of items, and a resubmission writes the same bytes.
Nothing here imports torch, diffusers or openvino.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from darkroom.prompts import PromptLine
from darkroom.user_images import UserImage, read_output_sized_image, upload_user_images
from storage import Storage, keys
from tasks.request import GenerationRequest


def resolve_controls(lines: Sequence[PromptLine], request: GenerationRequest, storage: Storage,
                     base_dir: Path | None) -> dict[int, dict[str, Any]]:
    """Per prompt line of a ControlNet model, its control image's URI and the size it implies (the family's
    check_request has made sure every line has one). Every problem names the field and the line; nothing is
    uploaded unless every line is valid."""
    read: dict[Path, UserImage] = {}
    fields: dict[int, dict[str, Any]] = {}
    for pl in lines:
        given = request.given(pl.item)
        image = read_output_sized_image(str(given["control_image"]), from_column=pl.item.control_image is not None,
                                        base_dir=base_dir, read=read, width=given["width"], height=given["height"],
                                        field="control_image", line=pl.line, what="a control image")
        fields[pl.line] = {"control_image": image.digest, "width": image.width, "height": image.height}
    # Upload once per distinct file (content-addressed: an existing key already holds these bytes).
    uris = upload_user_images(read.values(), storage, keys.control_image_key)
    for entry in fields.values():
        entry["control_image"] = uris[entry["control_image"]]
    return fields
