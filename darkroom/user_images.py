"""A user's image file on the producer's side (control images, init images): read, checked, normalised to RGB PNG,
uploaded once per distinct file under a content-addressed key.

- Any 8-bit mode (L, LA, P, RGBA, CMYK, ...) is converted to RGB (alpha is dropped, as diffusers' own
  `convert("RGB")` does); 16-bit and float images (I;16, I, F) are refused.
- The digest is the sha256 of the file as given, so the same file maps to the same key whatever the number of
  items, and a resubmission writes the same bytes.
Nothing here imports torch, diffusers or openvino.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from storage import Storage
from tasks.errors import InvalidRequest

REFUSED_MODES = {"I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer", "F": "float"}


@dataclass(frozen=True)
class UserImage:
    digest: str
    png: bytes
    width: int
    height: int


def read_user_image(path: Path, *, field: str, line: int | None = None) -> UserImage:
    """A local image, checked and normalised to RGB PNG; InvalidRequest naming `field` and `line` otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}", field=field, line=line) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            rgb = image.convert("RGB") if mode not in REFUSED_MODES else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidRequest(f"{path} is not a readable image ({exc})".splitlines()[0], field=field,
                             line=line) from None
    if rgb is None:
        raise InvalidRequest(f"{path} is a {REFUSED_MODES[mode]} image ({mode}); save it as 8-bit RGB",
                             field=field, line=line)
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return UserImage(hashlib.sha256(data).hexdigest(), out.getvalue(), rgb.size[0], rgb.size[1])


def read_output_sized_image(path_text: str, *, from_column: bool, base_dir: Path | None,
                            read: dict[Path, UserImage], width: int | None, height: int | None, field: str,
                            line: int, what: str) -> UserImage:
    """An item's image that is also its output size (control and init images), read once per distinct path.

    A path from the item's own column is relative to `base_dir` (the prompts file's folder); sides must be
    multiples of 8, and a size the item (or the batch) asks for must be the image's: nothing is resized.
    """
    path = Path(path_text).expanduser()
    if not path.is_absolute() and from_column and base_dir is not None:
        path = base_dir / path
    if path not in read:
        read[path] = read_user_image(path, field=field, line=line)
    image = read[path]
    if image.width % 8 or image.height % 8:
        raise InvalidRequest(f"{path} is {image.width}x{image.height}; both sides must be multiples of 8",
                             field=field, line=line)
    if (width is not None and width != image.width) or (height is not None and height != image.height):
        raise InvalidRequest(f"{path} is {image.width}x{image.height} but the item asks for "
                             f"{width or image.width}x{height or image.height}; give {what} of the "
                             "output size (it is not resized)", field=field, line=line)
    return image


def upload_user_images(images: Iterable[UserImage], storage: Storage, key_of: Callable[[str], str]) -> dict[str, str]:
    """Each image's storage URI by digest, uploading it under `key_of(digest)` unless that key already exists
    (content-addressed: an existing key already holds these bytes)."""
    uris: dict[str, str] = {}
    for image in images:
        if image.digest in uris:
            continue
        key = key_of(image.digest)
        uris[image.digest] = storage.uri(key) if storage.exists(key) else storage.put_bytes(
            key, image.png, content_type="image/png")
    return uris
