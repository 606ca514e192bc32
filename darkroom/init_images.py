"""Image-to-image init images on the producer's side: checked, normalised, uploaded once, referenced by URI.

Rules (README "Model families"):
- `--init-image PATH` (or an `init_image` column, relative to the prompts file's folder) makes an item
  image-to-image; `--strength` (or a `strength` column) in (0, 1] says how much of it to redraw (default 0.8),
  and int(steps * strength) must be at least 1 step.
- Only SD 1.x models (family "sd") take an init image.
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

IMG2IMG_FAMILIES = ("sd",)
DEFAULT_STRENGTH = 0.8


def resolve_init_images(lines: Sequence[PromptLine], *, family: str, model: str, storage: Storage,
                        init_image: str | Path | None, strength: float | None, steps: int,
                        width: int | None, height: int | None,
                        base_dir: Path | None) -> dict[int, dict[str, Any]]:
    """Per prompt line that is image-to-image, its job fields (init_image URI, strength, width, height).

    Every problem names the field and the line; nothing is uploaded unless every line is valid.
    """
    if strength is not None and not 0.0 < strength <= 1.0:
        raise InvalidRequest(f"{strength} is outside (0, 1]", field="strength")
    read: dict[Path, UserImage] = {}
    fields: dict[int, dict[str, Any]] = {}
    for pl in lines:
        item = pl.item
        path_text = item.init_image or (str(init_image) if init_image is not None else None)
        if path_text is None:
            if item.strength is not None:
                raise InvalidRequest("a strength without an init image (give --init-image or an init_image "
                                     "column)", field="strength", line=pl.line)
            continue
        if family not in IMG2IMG_FAMILIES:
            raise InvalidRequest(f"model {model!r} is a {family!r} model; image-to-image needs an SD 1.x model "
                                 f"(family {', '.join(IMG2IMG_FAMILIES)})", field="init_image", line=pl.line)
        image = read_output_sized_image(path_text, from_column=item.init_image is not None, base_dir=base_dir,
                                        read=read, width=item.width or width, height=item.height or height,
                                        field="init_image", line=pl.line, what="an init image")
        chosen = item.strength if item.strength is not None else (
            DEFAULT_STRENGTH if strength is None else strength)
        item_steps = item.steps or steps
        if min(int(item_steps * chosen), item_steps) < 1:
            raise InvalidRequest(f"strength {chosen} with {item_steps} steps leaves no denoising step "
                                 "(int(steps * strength) must be at least 1)", field="strength", line=pl.line)
        fields[pl.line] = {"digest": image.digest, "strength": chosen, "width": image.width,
                           "height": image.height}
    # Upload once per distinct file (content-addressed: an existing key already holds these bytes).
    uris = upload_user_images(read.values(), storage, keys.init_image_key)
    for entry in fields.values():
        entry["init_image"] = uris[entry.pop("digest")]
    return fields
