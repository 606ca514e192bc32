"""The demo model's prompt-adherence scorer: grammar, hue rule, shape classifier, and `darkroom score`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from darkroom.demo_model import shipped_model_dir
from storage import keys, open_storage
from testkit.fleet import run_cli
from tests.conftest import redis_db_url
from workers.demo_model import shapes
from workers.demo_model.scorer import ShapeClassifier, colour_of, judge, summarise

SCORER = shipped_model_dir() / "scorer"


@pytest.fixture(scope="module")
def classifier() -> ShapeClassifier:
    return ShapeClassifier(SCORER)


@pytest.fixture(scope="module")
def ground_truth() -> tuple[list[np.ndarray], list[shapes.Scene]]:
    # A seed the classifier never trained on.
    rng = np.random.default_rng(20261202)
    scenes = [shapes.random_scene(rng) for _ in range(240)]
    return [shapes.draw(scene, rng) for scene in scenes], scenes


def test_the_grammar_parses_its_prompts_and_nothing_else() -> None:
    assert shapes.parse_prompt("a red circle") == shapes.Prompt("red", "circle")
    assert shapes.parse_prompt("A large  Blue Square on a grey background.") == shapes.Prompt(
        "blue", "square", "large", "gray")
    for outside in ("a purple circle", "two red circles", "a red circle and a blue square", "", "red circle"):
        assert shapes.parse_prompt(outside) is None, outside
    assert len(shapes.grid_prompts()) == 12
    assert all(shapes.parse_prompt(c) for c in shapes.all_captions())


def test_procedural_ground_truth_scores_full_marks(classifier: ShapeClassifier, ground_truth: tuple) -> None:
    images, scenes = ground_truth
    prompts = [s.caption(with_size=i % 2 == 0, with_background=i % 3 == 0) for i, s in enumerate(scenes)]
    result = summarise(judge(images, prompts, classifier))
    assert result["scored"] == 240 and result["unscorable"] == 0
    assert result["accuracy"] >= 99.0, [i for i in result["items"] if not i["correct"]][:5]


def test_wrong_colours_and_wrong_shapes_are_rejected(classifier: ShapeClassifier, ground_truth: tuple) -> None:
    images, scenes = ground_truth
    colours, kinds = list(shapes.COLOURS), list(shapes.SHAPES)
    wrong_colour = [f"a {colours[(colours.index(s.colour) + 1) % 4]} {s.shape}" for s in scenes]
    wrong_shape = [f"a {s.colour} {kinds[(kinds.index(s.shape) + 1) % 3]}" for s in scenes]
    wrong_size = [f"a {'small' if s.size == 'large' else 'large'} {s.colour} {s.shape}" for s in scenes]
    for prompts in (wrong_colour, wrong_shape, wrong_size):
        assert summarise(judge(images, prompts, classifier))["accuracy"] <= 2.0


def test_off_palette_and_empty_images_are_wrong_not_matched(classifier: ShapeClassifier) -> None:
    scene = shapes.Scene("green", "triangle", "large", "white", 20.0, 32.0, 32.0)
    green = shapes.draw(scene)
    teal = green.copy()
    mask = np.abs(green.astype(int) - shapes.COLOURS["green"]).sum(axis=-1) < 60
    teal[mask] = (30, 170, 170)  # the drift the issue saw: a green triangle turned teal
    blank = np.full_like(green, 128)
    assert colour_of(green)[0] == "green" and colour_of(teal)[0] == "other" and colour_of(blank)[0] == "none"
    verdicts = judge([green, teal, blank], ["a green triangle"] * 3, classifier)
    assert [v.correct for v in verdicts] == [True, False, False]
    assert verdicts[2].seen == {"colour": "none", "shape": "none"}


def test_prompts_outside_the_grammar_are_unscorable_not_failures(classifier: ShapeClassifier) -> None:
    image = shapes.draw(shapes.Scene("red", "circle", "large", "gray", 20.0, 32.0, 32.0))
    result = summarise(judge([image, image], ["a red circle", "a cat in a hat"], classifier))
    assert result["accuracy"] == 100.0 and result["scored"] == 1 and result["unscorable"] == 1
    assert result["per_prompt"]["a cat in a hat"] == {"scorable": False, "images": 1, "correct": 0, "accuracy": None}


def test_darkroom_score_reads_the_batch_and_writes_adherence_json(redis_server: object, tmp_path: Path) -> None:
    storage_url = str(tmp_path / "storage")
    storage = open_storage(storage_url)
    rng = np.random.default_rng(5)
    cases = [("a red circle", "red", "circle"), ("a red circle", "blue", "circle"), ("a blue square", "blue", "square"),
             ("a cat in a hat", "green", "triangle")]
    items = []
    for index, (prompt, colour, shape) in enumerate(cases):
        buffer = io.BytesIO()
        Image.fromarray(shapes.draw(shapes.random_scene(rng, colour=colour, shape=shape))).save(buffer, "PNG")
        storage.put_bytes(keys.image_key("b1", index), buffer.getvalue())
        items.append({"batch_id": "b1", "index": index, "status": "done", "prompt": prompt, "seed": index})
    items.append({"batch_id": "b1", "index": 4, "status": "failed", "prompt": "a red square", "error": "boom"})
    storage.put_json(keys.batch_manifest_key("b1"), {"state": "done", "total": 5, "done": 4, "failed": 1,
                                                      "items": items})
    env = {"DARKROOM_BROKER_URL": redis_db_url(redis_server, 14), "DARKROOM_STORAGE_URL": storage_url}
    done = run_cli("score", "b1", env=env)
    assert done.returncode == 0, done.stderr
    assert "50.0%  1/2  a red circle" in done.stdout and "unscorable" in done.stdout
    assert "overall: 66.7% of 3 scorable image(s), 1 unscorable" in done.stdout
    written = storage.get_json(keys.batch_adherence_key("b1"))
    assert written["accuracy"] == 66.67 and written["not_done"] == [4]
    assert [i["correct"] for i in written["items"]] == [True, False, True, False]
    as_json = json.loads(run_cli("score", "b1", "--json", env=env).stdout)
    assert as_json["per_prompt"]["a blue square"]["accuracy"] == 100.0
    # Bad input: one line naming the problem, no traceback.
    for args, needle in ((("score", "nope"), "unknown batch"), (("score", "../x"), "invalid batch name"),
                         (("score", "b1", "--scorer", str(tmp_path)), "--scorer")):
        bad = run_cli(*args, env=env)
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
