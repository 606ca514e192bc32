"""A batch's gallery: the contact sheet and a static index.html with a thumbnail and the metadata of each image.

Everything that came from a user (prompts above all) is HTML-escaped, and the page's Content-Security-Policy
allows no script at all, so a prompt like `<script>...` is shown as text and could not run even if escaping
were ever missed. The page needs no server: open it from disk, or serve the folder as it is.
"""

from __future__ import annotations

import html
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from darkroom.contact_sheet import contact_sheet
from storage import LocalStorage, ObjectNotFound, Storage, keys
from tasks.schemas import ItemResult

THUMB_SIDE = 256
# Thumbnails after the first screens load lazily; the first ones load at once, so the page looks whole at once.
EAGER_THUMBS = 24
SHOWN_FIELDS = ("seed", "model", "precision", "steps", "scheduler", "guidance", "size", "negative_prompt", "device")
_CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


def default_gallery_dir(batch_id: str) -> Path:
    return Path("darkroom-data") / "gallery" / keys.check_name("batch", batch_id)


def write_gallery(storage: Storage, batch_id: str, items: Sequence[ItemResult], out_dir: Path, *,
                  state: str = "") -> Path:
    """Write contact-sheet.png, thumbs/ and index.html into `out_dir`; returns the index.html path.

    Images in a local store are linked where they lie; images in S3 are downloaded beside the page first
    (`out_dir/images/<batch>/`), so the page works offline either way.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    items = sorted(items, key=lambda i: i.index)
    local = storage if isinstance(storage, LocalStorage) else _mirror(storage, batch_id, items, out_dir)
    requested = _requested_items(storage, batch_id)
    # 1. The contact sheet, from the same local copies the page links to.
    (out_dir / "contact-sheet.png").write_bytes(contact_sheet(local, batch_id, list(items)))
    # 2. A thumbnail and the metadata of each image.
    thumbs = out_dir / "thumbs"
    thumbs.mkdir(exist_ok=True)
    cards = []
    for item in items:
        meta = dict(requested.get(item.index, {}))
        image_href = thumb_href = None
        if item.status == "done":
            path = local.root.joinpath(*keys.image_key(batch_id, item.index).split("/"))
            data = path.read_bytes()
            meta.update(_png_text(data))
            thumb = thumbs / f"{item.index:05d}.png"
            thumb.write_bytes(_thumbnail(data))
            image_href, thumb_href = _href(path, out_dir), _href(thumb, out_dir)
        cards.append(_card(item, meta, image_href, thumb_href))
    # 3. The page, written whole then renamed, so a browser never shows half of it.
    page = _page(batch_id, items, cards, state)
    index = out_dir / "index.html"
    partial = out_dir / ".index.html.partial"
    partial.write_text(page, encoding="utf-8")
    partial.replace(index)
    return index


def _mirror(storage: Storage, batch_id: str, items: Iterable[ItemResult], out_dir: Path) -> LocalStorage:
    """Copies of the batch's images under out_dir, in the store's own key layout."""
    mirror = LocalStorage(out_dir)
    for item in items:
        if item.status == "done":
            key = keys.image_key(batch_id, item.index)
            mirror.put_bytes(key, storage.get_bytes(key), content_type="image/png")
    return mirror


def _requested_items(storage: Storage, batch_id: str) -> dict[int, dict[str, Any]]:
    """What the producer asked for, per item: the metadata of items that have no image (failed ones)."""
    try:
        request = storage.get_json(keys.batch_request_key(batch_id))
    except ObjectNotFound:
        return {}
    fields = {"prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "scheduler", "model",
              "precision"}
    return {i["index"]: {k: v for k, v in i.items() if k in fields} for i in request.get("items", [])
            if isinstance(i, dict) and isinstance(i.get("index"), int)}


def _png_text(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return dict(getattr(img, "text", {}))


def _thumbnail(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buffer = io.BytesIO()
        img.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()


def _href(path: Path, out_dir: Path) -> str:
    return quote(Path(os.path.relpath(path, out_dir)).as_posix())


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _card(item: ItemResult, meta: Mapping[str, Any], image_href: str | None, thumb_href: str | None) -> str:
    prompt = meta.get("prompt", item.prompt)
    shown = dict(meta)
    shown.setdefault("seed", item.seed)
    if "width" in meta and "height" in meta:
        shown["size"] = f"{meta['width']}x{meta['height']}"
    rows = "".join(f"<dt>{_e(k.replace('_', ' '))}</dt><dd>{_e(shown[k])}</dd>"
                   for k in SHOWN_FIELDS if shown.get(k) not in (None, ""))
    loading = ' loading="lazy"' if item.index >= EAGER_THUMBS else ""
    if thumb_href and image_href:
        picture = (f'<a href="{_e(image_href)}"><img src="{_e(thumb_href)}" alt="image {item.index}"'
                   f'{loading}></a>')
    else:
        picture = f'<div class="missing">failed: {_e(item.error)}</div>'
    return (f'<figure class="item {_e(item.status)}" id="item-{item.index}">{picture}'
            f'<figcaption><p class="index">#{item.index}</p><p class="prompt">{_e(prompt)}</p>'
            f"<dl>{rows}</dl></figcaption></figure>")


def _page(batch_id: str, items: Sequence[ItemResult], cards: list[str], state: str) -> str:
    done = sum(i.status == "done" for i in items)
    failed = sum(i.status == "failed" for i in items)
    summary = f"{done} done, {failed} failed of {len(items)}" + (f" ({state})" if state else "")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>darkroom: {_e(batch_id)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #f4f4f4; color: #222; }}
header p {{ color: #555; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax({THUMB_SIDE}px, 1fr)); gap: 1rem; }}
figure {{ margin: 0; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: .5rem; }}
figure img {{ width: 100%; height: auto; display: block; }}
figure.failed .missing {{ background: #999; color: #fff; padding: 1rem; min-height: 6rem; overflow-wrap: anywhere; }}
.prompt {{ font-weight: 600; overflow-wrap: anywhere; white-space: pre-wrap; }}
.index {{ color: #888; margin: .3rem 0 0; }}
dl {{ display: grid; grid-template-columns: auto 1fr; gap: 0 .6rem; font-size: .85rem; margin: 0; }}
dt {{ color: #777; }} dd {{ margin: 0; overflow-wrap: anywhere; }}
</style>
</head>
<body>
<header>
<h1>batch {_e(batch_id)}</h1>
<p class="summary">{_e(summary)}</p>
<p><a href="contact-sheet.png">contact sheet</a></p>
</header>
<main class="grid">
{chr(10).join(cards)}
</main>
</body>
</html>
"""
