"""Model families: which converter and which OpenVINO pipeline serve a model, keyed by family name.

A family is named in requests and manifests (tasks.names.FAMILIES) and detected from a diffusers folder's
model_index.json `_class_name`. Entries name their code as "module:attribute" strings, imported on first use,
so importing this registry imports neither torch nor openvino.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import keys


@dataclass(frozen=True)
class Family:
    name: str
    class_names: tuple[str, ...]  # model_index.json `_class_name`s of diffusers pipelines of this family
    convert: str  # "module:function" (source_dir, out_dir, *, weight_format) -> ConversionResult
    fingerprint: str  # "module:function" (source_dir, *, weight_format) -> 16 hex chars
    pipeline: str  # "module:Class" with .load(ir_dir, *, device, width, height, cfg, core, ov_config)
    img2img: str | None = None  # "module:Class" for image-to-image requests, if the family has one


REGISTRY: dict[str, Family] = {
    "sd": Family(
        "sd", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
        convert="workers.convert.sd:convert_sd", fingerprint="workers.convert.sd:fingerprint_source",
        pipeline="workers.pipelines.sd:OVStableDiffusion",
        img2img="workers.pipelines.img2img:OVStableDiffusionImg2Img"),
    "sdxl": Family(
        "sdxl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
        convert="workers.convert.sdxl:convert_sdxl", fingerprint="workers.convert.sdxl:fingerprint_sdxl",
        pipeline="workers.pipelines.sdxl:OVStableDiffusionXL"),
    "controlnet": Family(
        "controlnet", ("StableDiffusionControlNetPipeline",),
        convert="workers.convert.controlnet:convert_controlnet",
        fingerprint="workers.convert.controlnet:fingerprint_controlnet_source",
        pipeline="workers.pipelines.controlnet:OVControlNetPipeline"),
    # A combined folder (prior_* and decoder components), or a decoder folder with its prior in prior/.
    "wuerstchen": Family(
        "wuerstchen", ("WuerstchenCombinedPipeline", "WuerstchenDecoderPipeline"),
        convert="workers.convert.wuerstchen:convert_wuerstchen",
        fingerprint="workers.convert.wuerstchen:fingerprint_wuerstchen",
        pipeline="workers.pipelines.wuerstchen:OVWuerstchen"),
}


class UnknownFamily(ValueError):
    """A family name nobody registered, or a diffusers pipeline class no family converts."""


def get_family(name: str) -> Family:
    if name not in REGISTRY:
        raise UnknownFamily(f"unknown model family {name!r}; known families: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def detect_family(source_dir: Path) -> str:
    """The family of a diffusers folder, from its model_index.json `_class_name`."""
    index_path = Path(source_dir) / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{source_dir} is not a diffusers model folder (no model_index.json)")
    class_name = json.loads(index_path.read_text(encoding="utf-8")).get("_class_name", "")
    for family in REGISTRY.values():
        if class_name in family.class_names:
            return family.name
    raise UnknownFamily(f"{source_dir}: no model family converts a {class_name or 'pipeline without _class_name'}"
                        f" (known families: {', '.join(REGISTRY)})")


def check_family(source_dir: Path, requested: str | None) -> str:
    """The family to convert `source_dir` as: the detected one, which a requested family must match."""
    if requested is not None:
        get_family(requested)
    detected = detect_family(source_dir)
    if requested is not None and requested != detected:
        raise UnknownFamily(f"family {requested!r} does not fit this model: {source_dir} is a "
                            f"{detected!r} model; leave --family out to use the detected family")
    return detected


def load_attr(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def pipeline_class(family: str, *, img2img: bool = False) -> Any:
    entry = get_family(family)
    if img2img and entry.img2img is None:
        raise UnknownFamily(f"model family {family!r} has no image-to-image pipeline")
    return load_attr(entry.img2img if img2img else entry.pipeline)


def pipeline_for_artifact(ir_dir: Path, *, img2img: bool = False) -> Any:
    """The pipeline class of a fetched artifact folder, from the family its manifest.json records ("sd" if none)."""
    manifest = Path(ir_dir) / keys.ARTIFACT_MANIFEST
    family = json.loads(manifest.read_text(encoding="utf-8")).get("family", "sd") if manifest.is_file() else "sd"
    return pipeline_class(family, img2img=img2img)
