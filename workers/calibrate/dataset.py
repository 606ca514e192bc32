"""Calibration prompts read with the `datasets` library: a local file or folder, a cached dataset name, or
the small set darkroom ships."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.names import PROMPT_COLUMNS

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "calibration_prompts.txt"
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}
# A save_to_disk folder holds one of these; any other folder is read as data files.
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_DATASET_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

class CalibrationDataError(ValueError):
    """The calibration dataset is missing, unreadable, malformed, or holds no prompts."""


@dataclass(frozen=True)
class CalibrationPrompts:
    prompts: tuple[str, ...]
    fingerprint: str
    source: str


def load_calibration_prompts(dataset: str | None, subset_size: int) -> CalibrationPrompts:
    """The first `subset_size` non-empty prompts of `dataset` (None: the set shipped with darkroom)."""
    if subset_size < 1:
        raise ValueError(f"subset_size must be at least 1, got {subset_size}")
    if dataset is None:
        rows: Iterable[Any] = DEFAULT_PROMPTS.read_text(encoding="utf-8").splitlines()
        source = f"darkroom:{DEFAULT_PROMPTS.name}"
    else:
        rows, source = _dataset_column(dataset), dataset
    prompts: list[str] = []
    for row in rows:
        if isinstance(row, str) and row.strip():
            prompts.append(row.strip())
            if len(prompts) == subset_size:
                break
    if not prompts:
        raise CalibrationDataError(f"calibration dataset {source!r} holds no non-empty prompts")
    digest = hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    return CalibrationPrompts(prompts=tuple(prompts), fingerprint=digest, source=source)


def _dataset_column(dataset: str) -> Iterable[Any]:
    """The prompt column of a local file or folder, or of a dataset name from the Hugging Face cache."""
    import datasets
    from datasets.exceptions import DatasetsError

    path = Path(dataset).expanduser()
    what = f"calibration dataset {dataset!r}"
    if not dataset.strip():  # Path("") is the working directory
        raise CalibrationDataError(f"{what}: the name is empty")
    if not path.exists() and (path.suffix in _FILE_BUILDERS or not _DATASET_NAME.fullmatch(dataset)):
        raise CalibrationDataError(f"{what}: no such file or folder")
    if path.is_file() and path.suffix not in _FILE_BUILDERS:
        raise CalibrationDataError(f"{what}: unsupported file type {path.suffix!r} "
                                   f"(expected {', '.join(_FILE_BUILDERS)})")
    if path.is_file() and path.stat().st_size == 0:
        raise CalibrationDataError(f"{what}: the file is empty")
    try:
        if path.is_file():
            loaded = datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        elif path.is_dir() and any((path / marker).is_file() for marker in _SAVED_MARKERS):
            loaded = datasets.load_from_disk(str(path))
        else:
            # A folder of data files, or a name: a name resolves through the Hub, or only the local cache
            # when HF_HUB_OFFLINE=1 (set on machines that reach no hub, or this retries for ~25 s).
            loaded = datasets.load_dataset(str(path) if path.is_dir() else dataset)
    # Each of these has been seen for a bad file: StopIteration (an empty JSON Lines file), ArrowInvalid
    # (a ValueError), DatasetGenerationError (malformed rows), EmptyDatasetError (an OSError).
    except (OSError, ValueError, StopIteration, DatasetsError) as exc:
        cause = exc.__cause__ or exc.__context__
        detail = _first_line(exc) + (f" ({_first_line(cause)})" if cause is not None else "")
        raise CalibrationDataError(f"{what} could not be read: {detail}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            raise CalibrationDataError(f"{what} has no splits")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    column = next((c for c in PROMPT_COLUMNS if c in loaded.column_names), None)
    if column is None:
        raise CalibrationDataError(f"{what} has no prompt column: expected one of {', '.join(PROMPT_COLUMNS)}, "
                                   f"found {', '.join(loaded.column_names) or 'none'}")
    return (row[column] for row in loaded.select_columns([column]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
