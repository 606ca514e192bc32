"""Prompt files: .txt (a prompt a line), .jsonl (per-item overrides), .csv, or a `datasets` dataset.

Every line is validated before anything is enqueued; problems name the line and the field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tasks.errors import InvalidRequest, InvalidRequests
from tasks.names import PROMPT_COLUMNS
from tasks.request import check_limits
from tasks.schemas import ItemRequest, Limits, invalid_from_validation


@dataclass(frozen=True)
class PromptLine:
    """One valid item of a prompt source, with the line (or row) it came from."""

    line: int
    item: ItemRequest


@dataclass(frozen=True)
class ParsedPrompts:
    items: tuple[PromptLine, ...]
    problems: tuple[InvalidRequest, ...]


def load_prompts(
    source: str | Path | Sequence[str | dict[str, Any]],
    *,
    column: str | None = None,
    limits: Limits | None = None,
) -> ParsedPrompts:
    """Parse a prompt source into valid items and the problems of the invalid ones.

    `source` is a path (.txt, .jsonl, .csv, a saved `datasets` folder or data file), a `datasets`
    name resolved from the local cache, or an in-memory list of prompts or dicts.
    """
    limits = limits or Limits.from_env()
    if isinstance(source, (list, tuple)):
        rows: Iterable[tuple[int, Any]] = enumerate(source, start=1)
    else:
        rows = _rows_of(source, column)
    items: list[PromptLine] = []
    problems: list[InvalidRequest] = []
    for line, raw in rows:
        try:
            items.append(PromptLine(line, _item(raw, line, limits)))
        except InvalidRequest as exc:
            problems.append(exc)
    if not items and not problems:
        problems.append(InvalidRequest(f"no prompts in {_describe(source)}", field="prompts"))
    return ParsedPrompts(tuple(items), tuple(problems))


def require_prompts(parsed: ParsedPrompts, *, skip_invalid: bool = False) -> tuple[PromptLine, ...]:
    """The valid items, or every problem at once when any line is bad (unless skip_invalid)."""
    if parsed.problems and (not skip_invalid or not parsed.items):
        if len(parsed.problems) == 1:
            raise parsed.problems[0]
        raise InvalidRequests(list(parsed.problems))
    return parsed.items


def _item(raw: Any, line: int, limits: Limits) -> ItemRequest:
    if isinstance(raw, InvalidRequest):
        raise raw
    data = {"prompt": raw} if isinstance(raw, str) else raw
    if not isinstance(data, dict):
        raise InvalidRequest(f"expected a prompt or an object, got {type(raw).__name__}", line=line)
    try:
        item = ItemRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation(exc, line=line) from None
    check_limits(item.model_dump(exclude_none=True), limits, line=line)
    return item


def _rows_of(source: str | Path, column: str | None) -> Iterable[tuple[int, Any]]:
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _txt_rows(path)
        if suffix == ".jsonl":
            return _jsonl_rows(path)
        if suffix == ".csv" and column is None:
            return _csv_rows(path)
    if path.exists() or column is not None or _looks_like_dataset_name(str(source)):
        return _dataset_rows(str(source), column)
    raise InvalidRequest(f"no such prompt file: {source}", field="prompts")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                             field="prompts") from None


def _txt_rows(path: Path) -> Iterable[tuple[int, Any]]:
    # Blank lines and '#' comments are skipped; line numbers stay those of the file.
    for number, text in enumerate(_read_text(path).splitlines(), start=1):
        stripped = text.strip()
        if stripped and not stripped.startswith("#"):
            yield number, stripped


def _jsonl_rows(path: Path) -> Iterable[tuple[int, Any]]:
    for number, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, InvalidRequest(f"not valid JSON ({exc.msg} at column {exc.colno})", line=number)


def _csv_rows(path: Path) -> Iterable[tuple[int, Any]]:
    lines = _read_text(path).splitlines(keepends=True)
    reader = csv.DictReader(lines, strict=True)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise InvalidRequest(f"malformed CSV header ({exc})", line=1) from None
    if "prompt" not in header:
        raise InvalidRequest(f"the CSV header has no 'prompt' column (found: {', '.join(header) or 'none'})",
                             line=1, field="prompt")
    while True:
        start = reader.line_num + 1  # a quoted cell may span lines: a record is named by its first line
        while start <= len(lines) and not lines[start - 1].rstrip("\r\n"):
            start += 1  # the reader skips empty lines
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield start, InvalidRequest(f"malformed CSV ({exc})", line=start)
            continue
        if None in row:
            yield start, InvalidRequest("more cells than the header has columns", line=start)
            continue
        # Empty cells mean "not set": the batch default applies.
        yield start, {k: v for k, v in row.items() if v not in ("", None)}


def _looks_like_dataset_name(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and "." not in parts[-1][-5:]


def _dataset_rows(source: str, column: str | None) -> Iterable[tuple[int, Any]]:
    """Rows of a `datasets` dataset: a saved folder, a data file, or a name in the local cache."""
    try:
        import datasets  # a producer needs it only for this
    except ImportError:
        raise InvalidRequest("reading a dataset needs the 'datasets' package", field="prompts") from None
    table = _open_dataset(datasets, source)
    names = list(table.column_names)
    chosen = column or next((c for c in PROMPT_COLUMNS if c in names), None)
    if chosen is None or chosen not in names:
        raise InvalidRequest(f"dataset {source!r} has no column {column or 'prompt'!r} "
                             f"(columns: {', '.join(names)}); pick one with --column", field="column")
    for number, value in enumerate(table[chosen], start=1):
        yield number, value if isinstance(value, str) else InvalidRequest(
            f"expected text, got {type(value).__name__}", field=chosen, line=number)


def _open_dataset(datasets: Any, source: str) -> Any:
    path = Path(source)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            kind = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
            loaded = datasets.load_dataset(kind.get(path.suffix.lower(), "text"), data_files=str(path))
        else:
            loaded = datasets.load_dataset(source)
    except Exception as exc:  # datasets raises many kinds; the user needs one line
        raise InvalidRequest(f"cannot load dataset {source!r}: {exc}".splitlines()[0], field="prompts") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded = loaded[split]
    return loaded


def _describe(source: object) -> str:
    return "the given list" if isinstance(source, (list, tuple)) else str(source)
