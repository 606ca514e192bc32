"""A contact sheet: a batch's images on one PNG, in index order, with failed items left grey."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

from storage import Storage, keys
from tasks.schemas import ItemResult


def contact_sheet(storage: Storage, batch_id: str, items: list[ItemResult], *, thumb: int = 128,
                  columns: int | None = None) -> bytes:
    """PNG bytes of a grid of the batch's images, each labelled with its index and seed."""
    columns = columns or max(1, min(8, math.ceil(math.sqrt(len(items) or 1))))
    rows = max(1, math.ceil(len(items) / columns))
    label = 14
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, item in enumerate(sorted(items, key=lambda i: i.index)):
        x, y = (n % columns) * thumb, (n // columns) * (thumb + label)
        if item.status == "done":
            with Image.open(io.BytesIO(storage.get_bytes(keys.image_key(batch_id, item.index)))) as img:
                sheet.paste(img.convert("RGB").resize((thumb, thumb)), (x, y))
        else:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill="#999999")
        draw.text((x + 2, y + thumb), f"#{item.index} seed {item.seed}", fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def write_contact_sheet(storage: Storage, batch_id: str, items: list[ItemResult]) -> str:
    return storage.put_bytes(keys.contact_sheet_key(batch_id), contact_sheet(storage, batch_id, items),
                             content_type="image/png")
