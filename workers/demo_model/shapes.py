"""The procedural world of the demo model: one coloured shape on a plain background, and its captions.

Grammar (every prompt the scorer can judge)::

    a [small|large] {red|green|blue|yellow} {circle|square|triangle} [on a {white|gray|black} background]

Images are 64x64 RGB, drawn at 4x and downsampled so edges are anti-aliased. Everything is a pure function
of a numpy Generator, so a seed gives the same images on any machine. No torch here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SIZE = 64
_SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 35), "green": (40, 170, 60), "blue": (40, 75, 215), "yellow": (235, 205, 40),
}
BACKGROUNDS: dict[str, int] = {"white": 235, "gray": 128, "black": 22}
SIZES: dict[str, tuple[float, float]] = {"small": (0.14, 0.2), "large": (0.27, 0.36)}  # radius / image side

_PROMPT = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>red|green|blue|yellow) (?P<shape>circle|square|triangle)"
    r"(?: on an? (?P<background>white|gray|grey|black) background)?$"
)


@dataclass(frozen=True)
class Scene:
    """What one picture shows; the caption may mention only part of it."""

    colour: str
    shape: str
    size: str
    background: str
    radius: float  # pixels
    cx: float
    cy: float

    def caption(self, *, with_size: bool = False, with_background: bool = False) -> str:
        words = ["a"]
        if with_size:
            words.append(self.size)
        words += [self.colour, self.shape]
        if with_background:
            words += ["on", "a", self.background, "background"]
        return " ".join(words)


@dataclass(frozen=True)
class Prompt:
    """A prompt parsed by the grammar; None for what it leaves open."""

    colour: str
    shape: str
    size: str | None = None
    background: str | None = None


def parse_prompt(text: str) -> Prompt | None:
    """The prompt's parts, or None when the prompt is outside the grammar (and so cannot be scored)."""
    match = _PROMPT.match(" ".join(text.lower().replace(",", " ").split()).rstrip("."))
    if match is None:
        return None
    background = match["background"]
    return Prompt(colour=match["colour"], shape=match["shape"], size=match["size"],
                  background="gray" if background == "grey" else background)


def grid_prompts() -> list[str]:
    """The 12 test prompts, "a {colour} {shape}"."""
    return [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]


def random_scene(rng: np.random.Generator, *, colour: str | None = None, shape: str | None = None) -> Scene:
    colour = colour or str(rng.choice(list(COLOURS)))
    shape = shape or str(rng.choice(SHAPES))
    size = str(rng.choice(list(SIZES)))
    background = str(rng.choice(list(BACKGROUNDS)))
    low, high = SIZES[size]
    radius = float(rng.uniform(low, high)) * SIZE
    margin = radius + 2.0
    cx, cy = (float(rng.uniform(margin, SIZE - margin)) for _ in range(2))
    return Scene(colour=colour, shape=shape, size=size, background=background, radius=radius, cx=cx, cy=cy)


def draw(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as a uint8 64x64x3 array; with `rng`, colours and background jitter slightly."""
    from PIL import Image, ImageDraw

    grey = BACKGROUNDS[scene.background]
    fill = np.array(COLOURS[scene.colour], dtype=np.float64)
    if rng is not None:
        grey = int(np.clip(grey + rng.integers(-12, 13), 0, 255))
        fill = fill + rng.integers(-15, 16, size=3)
    big = SIZE * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    s = _SUPERSAMPLE
    r, cx, cy = scene.radius * s, scene.cx * s, scene.cy * s
    colour = tuple(int(c) for c in np.clip(fill, 0, 255))
    if scene.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif scene.shape == "square":
        half = r * 0.85  # a square of the same visual weight as the circle
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
    else:
        pen.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=colour)
    return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.LANCZOS), dtype=np.uint8)


def make_dataset(count: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """`count` images (uint8, N x 64 x 64 x 3) and their scenes; a pure function of (count, seed)."""
    rng = np.random.default_rng([seed, 0x5EED])
    scenes = [random_scene(rng) for _ in range(count)]
    images = np.stack([draw(scene, rng) for scene in scenes]) if scenes else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return images, scenes


def all_captions() -> list[str]:
    """Every caption the training can produce (with and without the optional phrases), sorted."""
    captions = set()
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                for background in BACKGROUNDS:
                    scene = Scene(colour, shape, size, background, 1.0, 0.0, 0.0)
                    for with_size in (False, True):
                        for with_background in (False, True):
                            captions.add(scene.caption(with_size=with_size, with_background=with_background))
    return sorted(captions)
