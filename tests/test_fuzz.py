"""Bad input, fuzzed with hypothesis: every request or prompt file is rejected before anything is enqueued,
naming the line and the field, or it is processed correctly. About 1,100 cases in all, most of them in
process against the real Redis and storage; a small slice goes through a real worker.

Reproducible: the `darkroom` profile is derandomized (same examples every run, no example database).
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.settings import Settings
from darkroom import submit
from darkroom.prompts import load_prompts
from darkroom.submit import send_jobs
from storage import keys, open_storage
from tasks.errors import InvalidRequest, InvalidRequests
from tasks.schemas import GenerateJob, Limits
from testkit.fleet import WorkerProcess, convert_model, run_cli, running_worker
from tests.conftest import queue_settings_for, redis_db_url

settings.register_profile("darkroom", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile("darkroom")

HOLD = "fuzz-hold"  # a queue no worker consumes: what a submission enqueued stays there to be counted
MAX_CHARS = 600  # DARKROOM_MAX_PROMPT_CHARS for this module: limits are configurable
LIMITS = Limits(max_prompt_chars=MAX_CHARS)
_ids = itertools.count()


@pytest.fixture(scope="module", autouse=True)
def _limits() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DARKROOM_MAX_PROMPT_CHARS", str(MAX_CHARS))
        yield


@pytest.fixture(scope="module")
def fuzz_settings(redis_server: object, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return queue_settings_for(tmp_path_factory.mktemp("fuzz"), redis_db_url(redis_server, 7))


@pytest.fixture(scope="module")
def worker(fuzz_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    with running_worker(fuzz_settings, ["generate.CPU", "convert"], tmp_path_factory) as process:
        yield process


@pytest.fixture(scope="module")
def model(worker: WorkerProcess, fuzz_settings: Settings, tiny_sd_dir: Path) -> str:
    convert_model(fuzz_settings, tiny_sd_dir, "fuzzy")
    return "fuzzy"


@pytest.fixture(scope="module")
def client(fuzz_settings: Settings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(fuzz_settings.broker_url)
    yield c
    c.close()


def held(client: redis.Redis) -> int:
    return int(client.llen(HOLD))


def stored(settings_: Settings, batch_id: str) -> list[str]:
    return open_storage(settings_.storage_url).list_keys(f"images/{batch_id}/")


def problems_of(exc: InvalidRequest) -> list[InvalidRequest]:
    return exc.problems if isinstance(exc, InvalidRequests) else [exc]


def submit_and_check(client: redis.Redis, settings_: Settings, source: Any, expected_images: int | None,
                     **options: Any) -> list[InvalidRequest]:
    """Submit; on rejection assert nothing was enqueued or stored and return the problems; on acceptance
    assert exactly `expected_images` jobs were enqueued (when given) and return []."""
    batch_id = f"fz-{next(_ids)}"
    before = held(client)
    try:
        handle = submit(source, batch_id=batch_id, queue=HOLD, settings=settings_, **options)
    except InvalidRequest as exc:
        assert held(client) == before, "a rejected request enqueued something"
        assert stored(settings_, batch_id) == [], "a rejected request left objects in storage"
        for problem in problems_of(exc):
            assert str(problem).strip() and "Traceback" not in str(problem)
        return problems_of(exc)
    assert handle.enqueued == handle.total == held(client) - before
    if expected_images is not None:
        assert handle.total == expected_images
    assert stored(settings_, batch_id) == [keys.batch_request_key(batch_id)]
    for job in held_jobs(client):
        check_job(job)
    client.delete(HOLD)
    return []


def held_jobs(client: redis.Redis) -> list[GenerateJob]:
    """The generation jobs waiting in the hold queue, read as a worker would: JSON only."""
    jobs = []
    for raw in client.lrange(HOLD, 0, -1):
        envelope = json.loads(raw)
        assert envelope["content-type"] == "application/json"
        _, kwargs, _ = json.loads(base64.b64decode(envelope["body"]))
        jobs.append(GenerateJob.model_validate(kwargs["job"]))
    return jobs


def check_job(job: GenerateJob) -> None:
    assert job.prompt.strip() and len(job.prompt) <= MAX_CHARS
    assert 1 <= job.steps <= LIMITS.max_steps and 0 <= job.guidance <= LIMITS.max_guidance
    assert job.width % 8 == 0 and job.height % 8 == 0 and job.width * job.height <= LIMITS.max_pixels
    assert 0 <= job.seed < 2**63 and math.isfinite(job.guidance)


# --- 1. Item requests (the schema), in process: 300 cases ---------------------------------------------------

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 7, 8, 12, 64, 150, 151, 4096, 4104, 2**63 - 1, 2**63, True, False, None]),
    st.text(max_size=6), st.lists(st.integers(), max_size=2),
)
FIELDS = ("seed", "steps", "guidance", "width", "height", "images_per_prompt")
PROMPTS = st.one_of(st.text(max_size=40), st.just(""), st.just("   "), st.text(min_size=MAX_CHARS + 1,
                    max_size=MAX_CHARS + 20), st.integers(), st.none(), st.just("a \ud800 surrogate"))


@settings(max_examples=300)
@given(prompt=PROMPTS, numbers=st.dictionaries(st.sampled_from(FIELDS), NUMBERS, max_size=4),
       scheduler=st.one_of(st.none(), st.sampled_from(["Euler-A", "pndm", "nope", "../x", ""])),
       extra=st.one_of(st.none(), st.sampled_from(["colour", "model", "../etc"])))
def test_item_requests_are_accepted_within_limits_or_rejected_naming_line_and_field(
        prompt: Any, numbers: dict[str, Any], scheduler: str | None, extra: str | None) -> None:
    raw: dict[str, Any] = {"prompt": prompt, **numbers}
    if scheduler is not None:
        raw["scheduler"] = scheduler
    if extra is not None:
        raw[extra] = "x"
    parsed = load_prompts([{"prompt": "fine"}, raw], limits=LIMITS)
    assert [p.line for p in parsed.items][:1] == [1]
    if parsed.problems:
        (problem,) = parsed.problems
        assert problem.line == 2 and str(problem).startswith("line 2")
        named = {f.strip() for f in (problem.field or problem.reason.split(":")[0]).split(";")}
        assert named <= set(raw) and named, (problem, raw)
        return
    item = parsed.items[1].item
    assert isinstance(item.prompt, str) and 0 < len(item.prompt) <= MAX_CHARS
    item.prompt.encode("utf-8")
    for name in FIELDS:
        value = getattr(item, name)
        assert value is None or (not isinstance(value, bool) and math.isfinite(value)), (name, value)
    assert item.steps is None or 1 <= item.steps <= LIMITS.max_steps
    assert item.guidance is None or 0 <= item.guidance <= LIMITS.max_guidance
    assert item.seed is None or 0 <= item.seed < 2**63
    assert item.images_per_prompt is None or 1 <= item.images_per_prompt <= LIMITS.max_images_per_prompt
    assert item.width is None or item.width >= 8


# --- 2. submit(...) options and names, against real Redis and storage: 250 cases ---------------------------

NAMES = st.one_of(st.sampled_from(["../fuzzy", "fuzzy/../x", "/etc/passwd", "fuzzy\n", "a\x00b", "..", ".hidden",
                                   "C:\\x", "fuzzy ", "x" * 129, ""]), st.text(max_size=12))


@settings(max_examples=250)
@given(options=st.fixed_dictionaries({}, optional={
    "steps": NUMBERS, "guidance": NUMBERS, "width": NUMBERS, "height": NUMBERS, "seed": NUMBERS,
    "images_per_prompt": NUMBERS, "negative_prompt": st.one_of(st.text(max_size=20), st.integers()),
    "model": NAMES, "batch_id": NAMES, "long_prompts": st.sampled_from(["reject", "truncate", "maybe"])}))
def test_submit_options_are_enqueued_correctly_or_rejected_before_enqueue(
        model: str, fuzz_settings: Settings, client: redis.Redis, options: dict[str, Any]) -> None:
    options.setdefault("model", model)
    explicit_batch = options.pop("batch_id", None)
    before = held(client)
    if explicit_batch is not None:
        # A path-like batch name never reaches Redis or storage.
        try:
            handle = submit(["a cat"], batch_id=explicit_batch, queue=HOLD, settings=fuzz_settings, **options)
        except InvalidRequest as exc:
            assert held(client) == before
            assert "Traceback" not in str(exc)
            return
        assert keys.check_name("batch", handle.batch_id) == explicit_batch
        client.delete(HOLD)
        return
    ipp = options.get("images_per_prompt")
    problems = submit_and_check(client, fuzz_settings, ["a cat", "a dog"], None, **options)
    if not problems:
        assert options["model"] == model and (ipp is None or int(ipp) >= 1)
        return
    names = {p.field for p in problems} | {p.reason.split(":")[0] for p in problems}
    assert names & {*options, "prompts"}, (problems, options)


# --- 3. Prompt files with known defects: every bad line is named, 300 cases --------------------------------

# Each defect: (field, stage, value). Stage 1 = the line's own checks, 2 = tokens (the model's 77),
# 3 = checks against the model's defaults (sizes); a file reports the first stage that has problems.
DEFECTS: dict[str, list[tuple[str, int, Any]]] = {
    "steps": [("steps", 1, 0), ("steps", 1, -3), ("steps", 1, "abc"), ("steps", 1, 1.5), ("steps", 1, 10**30),
              ("steps", 1, 151), ("steps", 1, True)],
    "guidance": [("guidance", 1, -1), ("guidance", 1, "NaN"), ("guidance", 1, 1e9), ("guidance", 1, "x")],
    "seed": [("seed", 1, -1), ("seed", 1, 2**63), ("seed", 1, "1.5e3")],
    "width": [("width", 1, 4), ("width", 3, 12), ("width", 3, 8192), ("width", 3, 4104)],
    "height": [("height", 1, 0), ("height", 3, 63)],
    "images_per_prompt": [("images_per_prompt", 1, 0), ("images_per_prompt", 1, 17)],
    "scheduler": [("scheduler", 1, "nope"), ("scheduler", 1, "../pndm")],
    "prompt": [("prompt", 1, ""), ("prompt", 1, "y" * (MAX_CHARS + 1)), ("prompt", 2, "cat " * 90)],
    "colour": [("colour", 1, "red")],
}
ALL_DEFECTS = [d for ds in DEFECTS.values() for d in ds]
SAFE_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp", "Zs")),
                    min_size=1, max_size=12)
GOOD_ROW = st.fixed_dictionaries({"prompt": SAFE_TEXT.filter(lambda t: not t.startswith("#"))}, optional={
    "seed": st.integers(0, 2**63 - 20), "steps": st.integers(1, 150), "guidance": st.floats(0, 50),
    "width": st.sampled_from([8, 64, 72, 512, 2048]), "images_per_prompt": st.integers(1, 3),
    "scheduler": st.sampled_from(["euler-a", "DDIM", "unipc"]), "negative_prompt": SAFE_TEXT})
ROW = st.one_of(GOOD_ROW.map(lambda r: (r, None)), st.tuples(GOOD_ROW, st.sampled_from(ALL_DEFECTS)).map(
    lambda t: ({**t[0], t[1][0]: t[1][2]}, t[1])))


def _as_jsonl(rows: list[dict[str, Any]]) -> tuple[str, list[int]]:
    text = []
    for r in rows:
        line = json.dumps(r, ensure_ascii=False)
        text.append(line.replace('"NaN"', "NaN") if r.get("guidance") == "NaN" else line)
    return "\n".join(text) + "\n", list(range(1, len(rows) + 1))


def _as_csv(rows: list[dict[str, Any]]) -> tuple[str, list[int]]:
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "prompt", k))
    if "prompt" not in columns:
        columns.insert(0, "prompt")
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue(), list(range(2, len(rows) + 2))


@settings(max_examples=300)
@given(rows=st.lists(ROW, min_size=1, max_size=6), kind=st.sampled_from(["jsonl", "csv", "txt"]))
def test_prompt_files_name_every_bad_line_and_field_and_enqueue_nothing(
        model: str, fuzz_settings: Settings, client: redis.Redis, rows: list[tuple[dict[str, Any], Any]],
        kind: str) -> None:
    if kind == "txt":  # a .txt line is only a prompt: keep the prompt defects
        rows = [({"prompt": r["prompt"]}, d if d and d[0] == "prompt" and d[2] else None) for r, d in rows]
        rows = [(r, d) for r, d in rows if r["prompt"].strip()]
        if not rows:
            return
        text, numbers = "\n".join(r["prompt"] for r, _ in rows) + "\n", list(range(1, len(rows) + 1))
    else:
        text, numbers = (_as_jsonl if kind == "jsonl" else _as_csv)([r for r, _ in rows])
    expected_by_stage: dict[int, set[tuple[int, str]]] = {1: set(), 2: set(), 3: set()}
    for line, (row, defect) in zip(numbers, rows, strict=True):
        if defect is not None:
            expected_by_stage[defect[1]].add((line, defect[0]))
        elif "width" in row and row["width"] * 64 > LIMITS.max_pixels:
            expected_by_stage[3].add((line, "width"))
    expected = next((s for s in expected_by_stage.values() if s), set())
    images = sum(r.get("images_per_prompt", 1) for r, _ in rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"prompts.{kind}"
        path.write_text(text, encoding="utf-8")
        problems = submit_and_check(client, fuzz_settings, path, images, model=model, steps=3)
    found = {(p.line, p.field or p.reason.split(":")[0]) for p in problems}
    # A stage-1 defect can also make pydantic name a second field of the same line; every line is named.
    assert {line for line, _ in found} == {line for line, _ in expected}, (text, problems)
    for line, field in expected:
        assert any(pl == line and field in (pf or "") for pl, pf in found), (line, field, problems)


# --- 4. Garbage files: never a crash, never a partial enqueue, 200 cases -----------------------------------

@settings(max_examples=200)
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=300),
                         st.lists(st.sampled_from(['{"prompt": "ok"}', "{", "[1, 2]", "null", '"just text"',
                                                   '{"prompt": "a", "steps": NaN}', '{"prompt": "\\ud83d"}',
                                                   'prompt,steps', 'a,"unclosed', 'x,1,2,3', "", "\x00",
                                                   '{"prompt": 1e999}', '"a\tb",3']),
                                  max_size=8).map("\n".join)),
       kind=st.sampled_from(["txt", "jsonl", "csv"]))
def test_garbage_prompt_files_are_rejected_with_a_line_or_processed(
        model: str, fuzz_settings: Settings, client: redis.Redis, content: str | bytes, kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"garbage.{kind}"
        (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
        problems = submit_and_check(client, fuzz_settings, path, None, model=model, steps=3)
    for p in problems:
        assert p.line is not None or p.field in ("prompts", "prompt"), p


# --- 5. The command line: exit 2, the line and field on stderr, no traceback, nothing enqueued ------------

CLI_CASES = [
    ("p.csv", "prompt,steps\na cat,3\n\"unclosed,4\n", "line 3"),
    ("p.csv", "prompt,steps\na cat,zero\n", "line 2: steps"),
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "width": 60}\n', "line 2: width"),
    ("p.jsonl", '{"prompt": "a", "steps": 1e9}\n', "line 1: steps"),
    ("p.txt", "a fine prompt\n" + "many words " * 40 + "\n", "line 2: prompt: 82 tokens"),
    ("p.txt", "ok\n\xff\xfe bad utf-8\n", "not UTF-8"),
]


@pytest.mark.parametrize(("name", "text", "needle"), CLI_CASES)
def test_darkroom_submit_rejects_bad_files_with_the_line_and_field(
        model: str, fuzz_settings: Settings, client: redis.Redis, tmp_path: Path, name: str, text: str,
        needle: str) -> None:
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1") if "\xff" in text else text.encode("utf-8"))
    before = held(client)
    done = run_cli("submit", str(path), "--model", model, "--queue", HOLD, "--batch-id", "cli-bad",
                   settings=fuzz_settings, env={"DARKROOM_MAX_PROMPT_CHARS": str(MAX_CHARS)})
    assert done.returncode == 2, done.stderr
    assert needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert held(client) == before and stored(fuzz_settings, "cli-bad") == []


# --- 6. Long prompts: reported, never silently cut ----------------------------------------------------------

LONG = "a very detailed painting of " + "red and blue cats " * 20


def test_long_prompts_are_rejected_by_the_producer_naming_line_and_token_count(
        model: str, fuzz_settings: Settings, client: redis.Redis) -> None:
    problems = submit_and_check(client, fuzz_settings, ["short", LONG, "short too"], None, model=model)
    (problem,) = problems
    assert problem.line == 2 and problem.field == "prompt"
    assert "tokens, more than the 77 the model reads" in str(problem) and "--long-prompts truncate" in str(problem)
    problems = submit_and_check(client, fuzz_settings, ["short"], None, model=model, negative_prompt=LONG)
    assert problems[0].field == "negative_prompt"


def test_truncate_policy_renders_and_records_a_warning_and_the_worker_enforces_reject(
        model: str, fuzz_settings: Settings) -> None:
    handle = submit(["short", LONG], model=model, steps=2, seed=5, long_prompts="truncate", settings=fuzz_settings)
    summary = handle.wait(timeout=300)
    assert (summary.done, summary.failed) == (2, 0)
    by_index = {i.index: i for i in summary.items}
    assert by_index[0].warnings == []
    assert by_index[1].warnings and "truncated to the 77 the model reads" in by_index[1].warnings[0]
    manifest = open_storage(fuzz_settings.storage_url).get_json(keys.batch_manifest_key(handle.batch_id))
    assert manifest["items"][1]["warnings"] == by_index[1].warnings
    # A producer that could not count (no tokenizer): the worker refuses the item under `reject`.
    from broker.progress import BatchProgress

    BatchProgress(fuzz_settings.broker_url).start("worker-rejects", 1, {})
    job = GenerateJob(batch_id="worker-rejects", index=0, prompt=LONG, seed=1, steps=2, guidance=7.5, width=64,
                      height=64, scheduler="pndm", model=model, precision=by_index[0].uri and "fp32",
                      fingerprint=manifest_fingerprint(fuzz_settings, model))
    send_jobs([job], fuzz_settings, queue="generate.CPU")
    from darkroom import BatchHandle

    failed = BatchHandle("worker-rejects", 1, fuzz_settings).wait(timeout=300)
    assert failed.failed == 1 and "prompt" in failed.items[0].error and "77" in failed.items[0].error


def manifest_fingerprint(settings_: Settings, model: str) -> str:
    return open_storage(settings_.storage_url).get_json(keys.model_default_key(model))["fingerprint"]


def test_producer_token_count_matches_the_workers_tokenizer(model: str, fuzz_settings: Settings) -> None:
    from darkroom.tokens import load_counter
    from tasks.models import resolve_model
    from workers.demo_model.clip_vocab import clip_tokenizer

    storage = open_storage(fuzz_settings.storage_url)
    counter = load_counter(storage, resolve_model(storage, model))
    assert counter is not None and counter.max_length == 77
    reference = clip_tokenizer()
    for text in ("a dog wearing hat", LONG, "Ünïcödé 猫 🐈‍⬛ مرحبا", "x" * 300, "  spaced\tout  "):
        assert counter.count(text) == len(reference(text, truncation=False).input_ids), text


# --- 7. Odd but valid inputs through a real worker: no crash, every item rendered (about 12 images) -------

@settings(max_examples=3)
@given(prompts=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Zl", "Zp")),
                                min_size=1, max_size=15).filter(lambda t: t.strip()), min_size=2, max_size=4),
       seed=st.sampled_from([0, 1, 2**32, 2**63 - 5]), size=st.sampled_from([(8, 8), (64, 40), (72, 64)]))
def test_odd_valid_inputs_render_on_a_real_worker(model: str, fuzz_settings: Settings, worker: WorkerProcess,
                                                   prompts: list[str], seed: int, size: tuple[int, int]) -> None:
    items = [{"prompt": p, "seed": seed + i} for i, p in enumerate(prompts)]
    handle = submit(items, model=model, steps=2, width=size[0], height=size[1], negative_prompt="\u202e\u0000",
                    guidance=0.0 if seed % 2 else 50.0, settings=fuzz_settings)
    summary = handle.wait(timeout=300)
    assert (summary.done, summary.failed) == (len(items), 0), [i.error for i in summary.items]
    assert worker.process is not None and worker.process.poll() is None
    storage = open_storage(fuzz_settings.storage_url)
    present = set(storage.list_keys(f"images/{handle.batch_id}/"))
    assert {keys.image_key(handle.batch_id, i) for i in range(len(items))} <= present
    assert not [k for k in present if k.endswith((".part", ".tmp"))]
    assert os.environ.get("DARKROOM_MAX_PROMPT_CHARS") == str(MAX_CHARS)
