"""Prompt adherence for the demo model's grammar: colour by a hue rule, shape by a small CNN.

The classifier is trained by `darkroom train-demo-model` on the procedural images and ships with the model
(`scorer/model.safetensors` + `scorer/config.json`); conversion copies that folder into the IR folder.
An image is right when every part its prompt names is right: colour and shape always, size and
background when the prompt states them. No OpenVINO here.
"""

from __future__ import annotations

import colorsys
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.demo_model import shapes

if TYPE_CHECKING:
    import torch

SCORER_DIR = "scorer"
CLASSIFIER_CONFIG: dict[str, Any] = {"kind": "darkroom-shape-classifier", "version": 1, "classes": list(shapes.SHAPES),
                                     "channels": [16, 32, 64], "input_size": shapes.SIZE}
# The foreground is what is clearly coloured: the backgrounds are grey.
_MIN_SATURATION, _MIN_VALUE = 0.35, 0.2
_MIN_FOREGROUND = 0.01  # of the image
_MAX_HUE_DISTANCE = 35.0  # degrees from the nearest named colour; further is "other" (e.g. teal)
_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in shapes.COLOURS.items()}
# Area of each shape per squared radius (as shapes.draw draws them), to read a size from a pixel count.
_AREA_PER_R2 = {"circle": np.pi, "square": 1.7**2, "triangle": 0.5 * 1.9 * 1.75}
_SIZE_SPLIT = (shapes.SIZES["small"][1] + shapes.SIZES["large"][0]) / 2 * shapes.SIZE


def build_classifier(channels: Iterable[int] = (16, 32, 64)) -> torch.nn.Module:
    import torch
    from torch import nn

    layers: list[nn.Module] = []
    previous = 3
    for width in channels:
        layers += [nn.Conv2d(previous, width, 3, stride=2, padding=1), nn.ReLU()]
        previous = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(previous, len(shapes.SHAPES))]
    return torch.nn.Sequential(*layers)


def prepare(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> the classifier's input: per-image standardised, so colour and light matter less."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != shapes.SIZE or x.shape[-2] != shapes.SIZE:
        x = torch.nn.functional.interpolate(x, size=(shapes.SIZE, shapes.SIZE), mode="area")
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x - mean) / std


class ShapeClassifier:
    """The shipped CNN, loaded from a `scorer/` folder."""

    def __init__(self, folder: Path) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} holds no scorer (no config.json)")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("kind") != CLASSIFIER_CONFIG["kind"]:
            raise ValueError(f"{config_path}: not a darkroom shape classifier (kind={config.get('kind')!r})")
        self.classes: list[str] = list(config["classes"])
        self.model = build_classifier(config["channels"])
        self.model.load_state_dict(load_file(folder / "model.safetensors"))
        self.model.eval()

    def predict(self, images: np.ndarray) -> list[str]:
        import torch

        if len(images) == 0:
            return []
        with torch.no_grad():
            logits = self.model(prepare(images))
        return [self.classes[i] for i in logits.argmax(dim=1).tolist()]


@dataclass(frozen=True)
class Judgement:
    prompt: str
    scorable: bool
    correct: bool = False
    expected: dict[str, str] = field(default_factory=dict)
    seen: dict[str, str] = field(default_factory=dict)


def colour_of(image: np.ndarray) -> tuple[str, float]:
    """The named colour of the image's coloured pixels ("none" or "other" when there is none), and the
    foreground's share of the image."""
    rgb = image[..., :3].astype(np.float64) / 255.0
    top, bottom = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(top > 0, (top - bottom) / np.maximum(top, 1e-6), 0.0)
    mask = (saturation > _MIN_SATURATION) & (top > _MIN_VALUE)
    share = float(mask.mean())
    if share < _MIN_FOREGROUND:
        return "none", share
    r, g, b = (rgb[..., i][mask] for i in range(3))
    hsv = np.array([colorsys.rgb_to_hsv(*px)[0] for px in zip(r, g, b, strict=True)]) * 2 * np.pi
    hue = float(np.degrees(np.arctan2(np.sin(hsv).mean(), np.cos(hsv).mean())) % 360)
    name, distance = min(((n, min(abs(hue - h), 360 - abs(hue - h))) for n, h in _HUES.items()), key=lambda t: t[1])
    return (name if distance <= _MAX_HUE_DISTANCE else "other"), share


def background_of(image: np.ndarray) -> str:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    level = float(np.median(border.mean(axis=-1)))
    return min(shapes.BACKGROUNDS, key=lambda name: abs(shapes.BACKGROUNDS[name] - level))


def judge(images: np.ndarray | list[np.ndarray], prompts: list[str], classifier: ShapeClassifier) -> list[Judgement]:
    """One judgement per (image, prompt); prompts outside the grammar are unscorable, not wrong."""
    resized = [_as_model_size(np.asarray(image)) for image in images]
    predicted = classifier.predict(np.stack(resized)) if resized else []
    judgements = []
    for image, shape, text in zip(resized, predicted, prompts, strict=True):
        prompt = shapes.parse_prompt(text)
        if prompt is None:
            judgements.append(Judgement(prompt=text, scorable=False))
            continue
        colour, share = colour_of(image)
        seen = {"colour": colour, "shape": shape if colour != "none" else "none"}
        expected = {"colour": prompt.colour, "shape": prompt.shape}
        if prompt.size is not None:
            radius = np.sqrt(share * shapes.SIZE**2 / _AREA_PER_R2[prompt.shape])
            seen["size"], expected["size"] = ("small" if radius < _SIZE_SPLIT else "large"), prompt.size
        if prompt.background is not None:
            seen["background"], expected["background"] = background_of(image), prompt.background
        judgements.append(Judgement(prompt=text, scorable=True, correct=seen == expected, expected=expected,
                                    seen=seen))
    return judgements


def _as_model_size(image: np.ndarray) -> np.ndarray:
    image = image[..., :3]
    if image.shape[:2] == (shapes.SIZE, shapes.SIZE):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((shapes.SIZE, shapes.SIZE), Image.Resampling.BOX))


def summarise(judgements: list[Judgement]) -> dict[str, Any]:
    """Per-prompt and overall accuracy (in percent of the scorable images), plus every judgement."""
    per_prompt: dict[str, dict[str, Any]] = {}
    for item in judgements:
        entry = per_prompt.setdefault(item.prompt, {"scorable": item.scorable, "images": 0, "correct": 0})
        entry["images"] += 1
        entry["correct"] += int(item.correct)
    for entry in per_prompt.values():
        entry["accuracy"] = round(100.0 * entry["correct"] / entry["images"], 2) if entry["scorable"] else None
    scorable = [j for j in judgements if j.scorable]
    correct = sum(j.correct for j in scorable)
    return {
        "accuracy": round(100.0 * correct / len(scorable), 2) if scorable else None,
        "scored": len(scorable), "correct": correct, "unscorable": len(judgements) - len(scorable),
        "per_prompt": per_prompt, "items": [asdict(j) for j in judgements],
    }


def find_scorer(model_dir: Path) -> Path | None:
    """The model's `scorer/` folder, if it ships one."""
    folder = Path(model_dir) / SCORER_DIR
    return folder if (folder / "config.json").is_file() else None
