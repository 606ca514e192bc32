"""Model families as the contract sees them: the fields each takes, its defaults, and its one `check_request`.

Rules (README "Model families"):
- SD 1.x ("sd") takes an init image (image-to-image) and a strength; no other family does.
- ControlNet ("controlnet") needs a control image for every item, and only it takes a control image, an annotator
  or a ControlNet scale.
- Wuerstchen renders in two denoising stages: `steps` and `guidance` are the decoder's (stage B), `prior_steps`
  and `prior_guidance` the prior's (stage C). Its defaults are diffusers' WuerstchenCombinedPipeline's (prior 60
  steps at guidance 4.0, decoder 12 steps at guidance 0.0, 1024x1024). It runs its own scheduler (recorded as
  "ddpm-wuerstchen") and takes no scheduler name. Its sides are multiples of 128: the prior's 42.67x and the
  decoder's 10.67x latent scales render exactly those sizes (1024 -> 24 -> 256 -> 1024).
- Only Wuerstchen takes the prior's fields.

Defaults resolve in one order, lowest first: COMMON_DEFAULTS, the family's, the model's manifest (width, height,
scheduler), the batch's request, the item's own line (tasks/request.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import InvalidRequest
from tasks.names import FAMILIES
from tasks.schemas import DEFAULT_CONTROLNET_SCALE, DEFAULT_STRENGTH

COMMON_DEFAULTS: Mapping[str, Any] = {
    "steps": 20, "guidance": 7.5, "negative_prompt": "", "images_per_prompt": 1,
    "controlnet_scale": DEFAULT_CONTROLNET_SCALE, "strength": DEFAULT_STRENGTH,
}
# The model's defaults when its manifest records none (an artifact older than the defaults): SD 1.x's native
# size and scheduler.
MANIFEST_FALLBACK: Mapping[str, Any] = {"width": 512, "height": 512, "scheduler": "pndm"}

CONTROL_FIELDS = ("control_image", "annotator", "controlnet_scale")
INIT_FIELDS = ("init_image", "strength")
PRIOR_FIELDS = ("prior_steps", "prior_guidance")

WUERSTCHEN = "wuerstchen"
WUERSTCHEN_SCHEDULER = "ddpm-wuerstchen"
WUERSTCHEN_SIDE = 1024
WUERSTCHEN_SIZE_MULTIPLE = 128
DEFAULT_PRIOR_STEPS, DEFAULT_PRIOR_GUIDANCE = 60, 4.0


@dataclass(frozen=True)
class Family:
    """What one model family accepts and defaults to, checked in one place for every way a request arrives."""

    name: str
    takes: frozenset[str] = frozenset()  # the optional fields (CONTROL/INIT/PRIOR_FIELDS) it accepts
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_control_image: bool = False
    size_multiple: int = 8
    own_scheduler: str | None = None  # a family that runs one scheduler of its own takes no scheduler name

    def check_request(self, given: Mapping[str, Any], *, model: str, line: int | None = None) -> None:
        """Refuse what this family cannot render. `given`: the fields as the batch's request and the item's line
        set them (None: not set), before any default; `line`: the prompt file's line, None for the batch."""
        for name in (*CONTROL_FIELDS, *INIT_FIELDS, *PRIOR_FIELDS):
            if given.get(name) is not None and name not in self.takes:
                raise InvalidRequest(self._refusal(name, model), field=name, line=line)
        if self.needs_control_image and line is not None and given.get("control_image") is None:
            raise InvalidRequest(f"model {model!r} is a ControlNet model: give a control image "
                                 "(--control-image PATH, or a control_image column)", field="control_image", line=line)
        if self.own_scheduler is not None and given.get("scheduler") is not None:
            raise InvalidRequest(f"Wuerstchen models run their own scheduler ({self.own_scheduler}); leave the "
                                 "scheduler out", field="scheduler", line=line)
        for name in ("width", "height"):
            value = given.get(name)
            if value is not None and self.size_multiple != 8 and value % self.size_multiple:
                raise InvalidRequest(f"{value} is not a multiple of {self.size_multiple}: Wuerstchen's stages render "
                                     f"multiples of {self.size_multiple} exactly (its default is {WUERSTCHEN_SIDE})",
                                     field=name, line=line)

    def _refusal(self, name: str, model: str) -> str:
        if name in PRIOR_FIELDS:
            return f"model {model!r} is a {self.name!r} model; {name} applies to Wuerstchen models only"
        if name == "init_image":
            return (f"model {model!r} is a {self.name!r} model; image-to-image needs an SD 1.x model "
                    f"(family {', '.join(f.name for f in FAMILY_RULES.values() if 'init_image' in f.takes)})")
        if name == "strength":
            return f"model {model!r} is a {self.name!r} model; strength applies to image-to-image (SD 1.x) only"
        return (f"model {model!r} is a {self.name!r} model, which takes no control image, annotator or "
                "ControlNet scale")


FAMILY_RULES: Mapping[str, Family] = {
    "sd": Family("sd", takes=frozenset(INIT_FIELDS)),
    "sdxl": Family("sdxl"),
    "controlnet": Family("controlnet", takes=frozenset(CONTROL_FIELDS), needs_control_image=True),
    WUERSTCHEN: Family(WUERSTCHEN, takes=frozenset(PRIOR_FIELDS), size_multiple=WUERSTCHEN_SIZE_MULTIPLE,
                       own_scheduler=WUERSTCHEN_SCHEDULER, defaults={
                           "steps": 12, "guidance": 0.0, "prior_steps": DEFAULT_PRIOR_STEPS,
                           "prior_guidance": DEFAULT_PRIOR_GUIDANCE, "scheduler": WUERSTCHEN_SCHEDULER,
                           "width": WUERSTCHEN_SIDE, "height": WUERSTCHEN_SIDE}),
}
assert set(FAMILY_RULES) == set(FAMILIES), "every family in tasks.names has its rules here"


def family_rules(name: str) -> Family:
    try:
        return FAMILY_RULES[name]
    except KeyError:
        raise InvalidRequest(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}",
                             field="family") from None
