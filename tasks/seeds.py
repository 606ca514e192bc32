"""Item seeds derive from the batch seed and the item's index, so a batch is reproducible item by item."""

from __future__ import annotations

import hashlib
import secrets

SEED_SPACE = 2**32  # what most tools accept, so a seed can be pasted elsewhere


def derive_seed(batch_seed: int, index: int) -> int:
    """A well-mixed seed for item `index`; the same inputs always give the same seed."""
    digest = hashlib.sha256(f"darkroom-seed:{batch_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_SPACE


def random_batch_seed() -> int:
    return secrets.randbelow(SEED_SPACE)
