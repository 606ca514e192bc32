"""ControlNet annotators from controlnet-aux, run on the worker: an input photo in, a control image out.

- canny: OpenCV's Canny edges (no weights).
- openpose: controlnet-aux's OpenPose body estimation, with its body network converted to OpenVINO IR (cached
  beside the worker's other caches) and run on the worker's device, as OpenVINO's ControlNet notebook does.
- mlsd, hed, lineart, depth (MiDaS DPT-hybrid), segment (Segment Anything ViT-H): controlnet-aux's PyTorch
  detectors, loaded from local weight files only (nothing is downloaded).

Weights live in one folder: $DARKROOM_ANNOTATOR_WEIGHTS, else <cache dir>/annotators. The file names are those
of the lllyasviel/Annotators repository (SAM's is facebookresearch's). A missing file is an AnnotatorUnavailable
naming the file and the folder. Every annotator returns an RGB uint8 image of its input's size.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_ENV = "DARKROOM_ANNOTATOR_WEIGHTS"
# Bump when an annotator's output for the same input and settings changes: cached annotations are keyed on it.
ANNOTATOR_VERSION = "darkroom-annotators-1"


class AnnotatorUnavailable(ValueError):
    """An annotator that cannot run here: unknown, or its weight file is not in the weights folder."""


@dataclass(frozen=True)
class AnnotatorSpec:
    name: str
    files: tuple[str, ...]  # weight files needed in the weights folder
    settings: dict[str, Any] = field(default_factory=dict)  # fixed keyword arguments of the detector call


SPECS: dict[str, AnnotatorSpec] = {s.name: s for s in (
    AnnotatorSpec("canny", (), {"low_threshold": 100, "high_threshold": 200}),
    AnnotatorSpec("openpose", ("body_pose_model.pth",), {"include_body": True, "include_hand": False,
                                                         "include_face": False}),
    AnnotatorSpec("mlsd", ("mlsd_large_512_fp32.pth",), {"thr_v": 0.1, "thr_d": 0.1}),
    AnnotatorSpec("hed", ("ControlNetHED.pth",), {"safe": False, "scribble": False}),
    AnnotatorSpec("lineart", ("sk_model.pth", "sk_model2.pth"), {"coarse": False}),
    AnnotatorSpec("depth", ("dpt_hybrid-midas-501f0c75.pt",), {}),
    AnnotatorSpec("segment", ("sam_vit_h_4b8939.pth",), {}),
)}


def weights_dir(cache_dir: Path | None = None) -> Path:
    configured = os.environ.get(WEIGHTS_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(cache_dir or Path.home() / ".cache" / "darkroom") / "annotators"


def spec_of(name: str) -> AnnotatorSpec:
    if name not in SPECS:
        raise AnnotatorUnavailable(f"unknown annotator {name!r}; choose one of {', '.join(SPECS)}")
    return SPECS[name]


def settings_digest(name: str) -> str:
    """16 hex chars naming (annotator, settings, version): part of a cached annotation's key."""
    text = json.dumps({"annotator": name, "settings": spec_of(name).settings, "version": ANNOTATOR_VERSION},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_weights(name: str, folder: Path) -> None:
    missing = [f for f in spec_of(name).files if not (folder / f).is_file()]
    if missing:
        raise AnnotatorUnavailable(
            f"annotator {name!r} needs the weight file{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"in {folder} (from the lllyasviel/Annotators repository); put {'them' if len(missing) > 1 else 'it'} "
            f"there or point {WEIGHTS_ENV} at the folder that holds {'them' if len(missing) > 1 else 'it'}")


class Annotators:
    """Warm annotators of one worker: each detector is loaded once per process and reused."""

    def __init__(self, *, folder: Path, ir_cache: Path, device: str = "CPU", core: Any | None = None,
                 ov_config: dict[str, str] | None = None) -> None:
        self.folder, self.ir_cache, self.device = Path(folder), Path(ir_cache), device
        self._core, self.ov_config = core, dict(ov_config or {})
        self._detectors: dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()
        self.runs = 0

    @property
    def core(self) -> Any:
        if self._core is None:
            import openvino as ov

            self._core = ov.Core()
        return self._core

    def __call__(self, name: str, image: np.ndarray) -> np.ndarray:
        """`image` (RGB uint8 H x W x 3) annotated by `name`, as RGB uint8 of the same size."""
        import cv2

        spec = spec_of(name)
        height, width = image.shape[:2]
        with self._lock:
            detector = self._detector(spec)
            # controlnet-aux resizes so the short side is `resolution` (rounded to 64): ask for the image's own.
            resolution = min(height, width)
            out = detector(image, detect_resolution=resolution, image_resolution=resolution, output_type="np",
                           **spec.settings)
            self.runs += 1
        out = np.asarray(out)
        if out.ndim == 2:
            out = np.repeat(out[:, :, None], 3, axis=2)
        if out.shape[:2] != (height, width):
            out = cv2.resize(out, (width, height), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(out[:, :, :3].astype(np.uint8))

    def _detector(self, spec: AnnotatorSpec) -> Callable[..., Any]:
        if spec.name not in self._detectors:
            check_weights(spec.name, self.folder)
            self._detectors[spec.name] = _LOADERS[spec.name](self)
        return self._detectors[spec.name]


def _canny(_: Annotators) -> Callable[..., Any]:
    from controlnet_aux.canny import CannyDetector

    return CannyDetector()


def _openpose(owner: Annotators) -> Callable[..., Any]:
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body

    path = owner.folder / "body_pose_model.pth"
    body = Body(str(path))
    xml = convert_body_network(body.model, owner.ir_cache / f"openpose-body-{_file_digest(path)}.xml")
    body.model = OVBodyNetwork(owner.core.read_model(xml), owner.core, owner.device, owner.ov_config)
    return OpenposeDetector(body)


def _from_pretrained(module: str, cls: str, **kwargs: Any) -> Callable[[Annotators], Callable[..., Any]]:
    def load(owner: Annotators) -> Callable[..., Any]:
        import importlib

        detector_cls = getattr(importlib.import_module(f"controlnet_aux.{module}"), cls)
        return detector_cls.from_pretrained(str(owner.folder), **kwargs)

    return load


def _segment(owner: Annotators) -> Callable[..., Any]:
    detector = _from_pretrained("segment_anything", "SamDetector")(owner)

    def call(image: np.ndarray, *, detect_resolution: int, image_resolution: int, output_type: str) -> Any:
        return detector(image, detect_resolution=detect_resolution, image_resolution=image_resolution,
                        output_type=output_type)

    return call


_LOADERS: dict[str, Callable[[Annotators], Callable[..., Any]]] = {
    "canny": _canny,
    "openpose": _openpose,
    "mlsd": _from_pretrained("mlsd", "MLSDdetector"),
    "hed": _from_pretrained("hed", "HEDdetector"),
    "lineart": _from_pretrained("lineart", "LineartDetector"),
    "depth": _from_pretrained("midas", "MidasDetector"),
    "segment": _segment,
}


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def convert_body_network(model: Any, xml: Path) -> Path:
    """OpenPose's body network (image [1, 3, H, W] -> PAFs [1, 38, H/8, W/8], heatmaps [1, 19, H/8, W/8]) as IR.

    Converted once per weight file; H and W stay dynamic, and each input size is compiled on first use.
    """
    import openvino as ov
    import torch

    if xml.is_file():
        return xml
    xml.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        converted = ov.convert_model(model.eval(), example_input=torch.zeros(1, 3, 184, 184),
                                     input=[ov.PartialShape([1, 3, -1, -1])])
    for port, name in zip(converted.outputs, ("pafs", "heatmaps"), strict=True):
        port.get_tensor().set_names({name})
    partial = xml.with_name(f".{xml.stem}.{os.getpid()}.xml")
    ov.save_model(converted, partial, compress_to_fp16=False)
    os.replace(partial.with_suffix(".bin"), xml.with_suffix(".bin"))
    os.replace(partial, xml)
    return xml


class OVBodyNetwork:
    """Stands in for controlnet-aux's torch body network inside its `Body`: same call, same outputs."""

    def __init__(self, model: Any, core: Any, device: str, ov_config: dict[str, str]) -> None:
        self.model, self.core, self.device, self.ov_config = model, core, device, ov_config
        self._compiled: dict[tuple[int, ...], Any] = {}

    def parameters(self) -> Any:
        # Body asks its network's parameters for the torch device of its input tensor: the CPU.
        import torch

        yield torch.zeros(())

    def __call__(self, data: Any) -> tuple[Any, Any]:
        import torch

        shape = tuple(int(d) for d in data.shape)
        if shape not in self._compiled:
            model = self.model.clone()
            model.reshape({model.inputs[0]: list(shape)})
            self._compiled[shape] = self.core.compile_model(model, self.device, self.ov_config)
        compiled = self._compiled[shape]
        results = compiled(np.ascontiguousarray(data.numpy(), dtype=np.float32))
        pafs, heatmaps = (torch.from_numpy(results[compiled.output(i)].copy()) for i in (0, 1))
        return pafs, heatmaps
