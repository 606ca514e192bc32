"""Score a finished batch in storage: its manifest's prompts against its images, written as adherence.json."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from workers.demo_model.scorer import SCORER_DIR, ShapeClassifier, judge, summarise


def default_scorer_dir(model_dir: Path) -> Path:
    """A demo model's scorer: it lives beside the model's weights."""
    return model_dir / SCORER_DIR


def score_batch(storage: Any, summary: Any, scorer_dir: Path) -> dict[str, Any]:
    """Judge every finished item of a batch (`summary`: its id, state, total and item results, as the client's
    batch summary gives them); failed items are listed, not scored. Returns the scores (also written to storage
    under keys.batch_adherence_key) with their key."""
    from PIL import Image

    from storage import keys

    batch_id = summary.batch_id
    done = sorted((i for i in summary.items if i.status == "done"), key=lambda i: i.index)
    images, prompts = [], []
    for item in done:
        data = storage.get_bytes(keys.image_key(batch_id, item.index))
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        prompts.append(item.prompt)
    result = summarise(judge(images, prompts, ShapeClassifier(scorer_dir)))
    for entry, item in zip(result["items"], done, strict=True):
        entry["index"] = item.index
    result.update(batch_id=batch_id, state=summary.state, total=summary.total,
                  not_done=sorted(i.index for i in summary.items if i.status != "done"))
    key = keys.batch_adherence_key(batch_id)
    storage.put_json(key, result)
    return {**result, "key": key}
