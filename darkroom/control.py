"""ControlNet control images on the producer's side: checked, normalised, uploaded once, referenced by URI.

Rules (README "Model families"):
- A ControlNet model needs a control image for every item (`--control-image` or a `control_image` column);
  any other model refuses one.
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
from tasks.errors import InvalidRequest
from tasks.schemas import MAX_CONTROLNET_SCALE, check_annotator

CONTROL_FAMILIES = ("controlnet",)


def resolve_controls(lines: Sequence[PromptLine], *, family: str, model: str, storage: Storage,
                     control_image: str | Path | None, annotator: str | None, controlnet_scale: float | None,
                     width: int | None, height: int | None, base_dir: Path | None) -> dict[int, dict[str, Any]]:
    """Per prompt line, the job fields of its control image (uploaded now) and the size it implies.

    Every problem names the field and the line; nothing is uploaded unless every line is valid.
    """
    if annotator is not None:
        annotator = _check_annotator(annotator, None)
    if controlnet_scale is not None and not 0.0 <= controlnet_scale <= MAX_CONTROLNET_SCALE:
        raise InvalidRequest(f"{controlnet_scale} is outside 0..{MAX_CONTROLNET_SCALE}", field="controlnet_scale")
    controlled = family in CONTROL_FAMILIES
    read: dict[Path, UserImage] = {}
    fields: dict[int, dict[str, Any]] = {}
    for pl in lines:
        item = pl.item
        path_text = item.control_image or (str(control_image) if control_image is not None else None)
        if not controlled:
            if path_text is not None or item.annotator or annotator or item.controlnet_scale is not None \
                    or controlnet_scale is not None:
                raise InvalidRequest(f"model {model!r} is a {family!r} model, which takes no control image, "
                                     "annotator or ControlNet scale", field="control_image", line=pl.line)
            continue
        if path_text is None:
            raise InvalidRequest(f"model {model!r} is a ControlNet model: give a control image "
                                 "(--control-image PATH, or a control_image column)", field="control_image",
                                 line=pl.line)
        image = read_output_sized_image(path_text, from_column=item.control_image is not None, base_dir=base_dir,
                                        read=read, width=item.width or width, height=item.height or height,
                                        field="control_image", line=pl.line, what="a control image")
        fields[pl.line] = {
            "control_digest": image.digest, "width": image.width, "height": image.height,
            "annotator": _check_annotator(item.annotator, pl.line) if item.annotator else annotator,
            "controlnet_scale": item.controlnet_scale if item.controlnet_scale is not None
            else (1.0 if controlnet_scale is None else controlnet_scale),
        }
    # Upload once per distinct file (content-addressed: an existing key already holds these bytes).
    uris = upload_user_images(read.values(), storage, keys.control_image_key)
    for entry in fields.values():
        entry["control_image"] = uris[entry.pop("control_digest")]
    return fields


def _check_annotator(name: str, line: int | None) -> str:
    try:
        return check_annotator(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="annotator", line=line) from None
