"""CLIP's real tokenizer, rebuilt offline from the BPE file that the `clip-anytorch` package ships.

The demo model and the tiny test models use it: these machines reach no model hub, so the vocabulary comes
from an installed package rather than a download.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

# CLIP's BPE file lists more merges than CLIP uses; its tokenizer keeps exactly this many (49408 ids in all:
# 256 bytes, 256 end-of-word bytes, 48894 merges, 2 special tokens).
_CLIP_MERGES = 49152 - 256 - 2
_CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
TEXT_LENGTH = 77

def _clip_bpe_path() -> Path:
    # find_spec locates the package without importing it: `import clip` itself needs pkg_resources.
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the clip-anytorch package is not installed; it ships CLIP's BPE vocabulary")
    return Path(next(iter(spec.submodule_search_locations))) / _CLIP_BPE_FILE


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from bytes to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    lines = gzip.decompress(_clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    # Line 0 is a version header; CLIP keeps the next _CLIP_MERGES lines.
    merges = tuple((a, b) for a, b in (line.split() for line in lines[1 : _CLIP_MERGES + 1]))
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer with the real vocabulary (ids match openai/clip-vit-large-patch14's)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    # transformers 5 takes the vocabulary as objects; vocab_file/merges_file would be silently ignored.
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), unk_token="<|endoftext|>",
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         model_max_length=TEXT_LENGTH)
