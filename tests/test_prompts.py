"""Prompt files: every format parses, and every bad line is named with its field before anything is sent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from darkroom.prompts import load_prompts, require_prompts
from tasks.errors import InvalidRequest, InvalidRequests


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_skips_blank_and_comment_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.txt", "# header\na cat\n\n  a dog  \n")
    items = require_prompts(load_prompts(path))
    assert [(i.line, i.item.prompt) for i in items] == [(2, "a cat"), (4, "a dog")]


def test_jsonl_overrides_and_errors_name_line_and_field(tmp_path: Path) -> None:
    lines = [
        {"prompt": "a cat", "seed": 7, "steps": 5, "scheduler": "Euler-A"},
        {"prompt": "a dog", "width": "wide"},
        {"prompt": "", "seed": 1},
        {"prompt": "x", "colour": "red"},
    ]
    path = _write(tmp_path, "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    parsed = load_prompts(path)
    assert [i.item.seed for i in parsed.items] == [7]
    assert parsed.items[0].item.scheduler == "euler-a"
    messages = [str(p) for p in parsed.problems]
    assert messages[0].startswith("line 2: width:")
    assert messages[1].startswith("line 3: prompt:") and "empty" in messages[1]
    assert messages[2].startswith("line 4: colour:")
    assert messages[3].startswith("line 5:") and "JSON" in messages[3]
    with pytest.raises(InvalidRequests) as info:
        require_prompts(parsed)
    assert len(info.value.problems) == 4
    assert [i.item.prompt for i in require_prompts(parsed, skip_invalid=True)] == ["a cat"]


def test_csv_with_overrides_and_a_ragged_row(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.csv", "prompt,seed,steps\na cat,3,\n\"a dog, running\",,12\nx,1,2,3\n")
    parsed = load_prompts(path)
    assert [(i.line, i.item.prompt, i.item.seed, i.item.steps) for i in parsed.items] == [
        (2, "a cat", 3, None), (3, "a dog, running", None, 12)]
    assert str(parsed.problems[0]).startswith("line 4:")


def test_csv_without_prompt_column_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.csv", "text,seed\na cat,1\n")
    with pytest.raises(InvalidRequest, match="no 'prompt' column"):
        load_prompts(path)


@pytest.mark.parametrize("text", ["", "\n\n# only a comment\n"])
def test_empty_prompt_file_is_rejected(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidRequest, match="no prompts"):
        require_prompts(load_prompts(_write(tmp_path, "p.txt", text)))


def test_non_utf8_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"a cat\n\xff\xfe\n")
    with pytest.raises(InvalidRequest, match="not UTF-8"):
        load_prompts(path)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="no such prompt file"):
        load_prompts(tmp_path / "nope.txt")


def test_limits_apply_per_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DARKROOM_MAX_STEPS", "10")
    path = _write(tmp_path, "p.jsonl", json.dumps({"prompt": "a", "steps": 11}) + "\n")
    with pytest.raises(InvalidRequest, match="line 1: steps: 11 is more than 10"):
        require_prompts(load_prompts(path))


def test_a_saved_dataset_is_read_by_column(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is a worker/producer extra")
    folder = tmp_path / "captions"
    datasets.Dataset.from_dict({"caption": ["a red cube", "a blue sphere"], "id": [1, 2]}).save_to_disk(folder)
    items = require_prompts(load_prompts(folder))
    assert [i.item.prompt for i in items] == ["a red cube", "a blue sphere"]
    with pytest.raises(InvalidRequest, match="no column 'title'"):
        load_prompts(folder, column="title")


def test_a_parquet_file_is_read_as_a_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="datasets is a worker/producer extra")
    path = tmp_path / "captions.parquet"
    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).to_parquet(str(path))
    assert [i.item.prompt for i in require_prompts(load_prompts(path))] == ["one", "two", "three"]
