"""Stable Diffusion 1.x (diffusers folder) to OpenVINO IR, in optimum-intel's folder layout.

The layout, and the input and output names, are optimum-intel's, so optimum-intel and openvino-genai can
load what darkroom converts:

    model_index.json, scheduler/scheduler_config.json, tokenizer/...
    text_encoder/openvino_model.{xml,bin}  input_ids -> last_hidden_state, pooler_output
    unet/openvino_model.{xml,bin}          sample, timestep, encoder_hidden_states -> out_sample
    vae_decoder/openvino_model.{xml,bin}   latent_sample -> sample
    vae_encoder/openvino_model.{xml,bin}   sample -> latent_parameters
    (each model folder also holds its diffusers/transformers config.json)

Shapes stay dynamic in the IR; workers reshape to a static size before compiling.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from workers.pipelines.sd import MODEL_XML

if TYPE_CHECKING:
    import openvino as ov
    import torch

# Part of every fingerprint: bump it when the IR this module writes changes, so old artifacts are not reused.
CONVERTER_VERSION = "darkroom-sd-ir-1"

WeightFormat = Literal["fp16", "fp32"]
TEXT_LENGTH = 77
# The source folders a conversion reads; the fingerprint covers exactly these (plus model_index.json).
SOURCE_COMPONENTS = ("scheduler", "tokenizer", "text_encoder", "unet", "vae")
_FINGERPRINT_SUFFIXES = (".json", ".txt", ".safetensors", ".bin", ".model")
# From a Hub repo: configs, tokenizer and the default safetensors weights; not the fp16/EMA variants, the
# safety checker or the monolithic .ckpt files, which would multiply the download for nothing.
_HUB_ALLOW = ["model_index.json", "scheduler/*.json", "tokenizer/*", "text_encoder/*.json", "unet/*.json",
              "vae/*.json", "text_encoder/*.safetensors", "unet/*.safetensors", "vae/*.safetensors"]
_HUB_IGNORE = ["*.fp16.*", "*.non_ema.*", "*.ema_only.*"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class SourceNotFound(ValueError):
    """The model source is neither a local diffusers folder nor a Hugging Face repo this machine can get."""


@dataclass(frozen=True)
class ConversionResult:
    out_dir: Path
    family: str
    fingerprint: str
    files: tuple[str, ...]
    seconds: float


def resolve_source(source: str) -> Path:
    """A local diffusers folder, or a Hugging Face repo id (downloaded, or from the cache when offline)."""
    # 1. A local folder wins: a path is never sent to the Hub.
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return path.resolve()
        raise SourceNotFound(f"model source {source!r} is a folder without model_index.json "
                             "(not a diffusers model)")
    if not _REPO_ID.fullmatch(source):
        raise SourceNotFound(f"model source {source!r}: no such folder, and not a Hugging Face repo id")
    # 2. A repo id: huggingface_hub honours HF_HUB_OFFLINE=1 (cache only) and HF_HOME/HF_HUB_CACHE itself.
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(source, allow_patterns=_HUB_ALLOW, ignore_patterns=_HUB_IGNORE))
    except (OSError, ValueError) as exc:  # every hub error (not found, offline, gated, bad id) is one of them
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceNotFound(f"model source {source!r}: no such folder, and the Hugging Face repo could not "
                             f"be loaded ({first_line})") from None
    if not (snapshot / "model_index.json").is_file():
        raise SourceNotFound(f"model source {source!r}: the Hugging Face repo has no model_index.json "
                             "(not a diffusers model)")
    return snapshot


def fingerprint_source(source_dir: Path, *, weight_format: str) -> str:
    """16 hex chars identifying what a conversion of `source_dir` would produce."""
    return fingerprint_folders(source_dir, SOURCE_COMPONENTS, version=CONVERTER_VERSION, weight_format=weight_format)


def fingerprint_folders(source_dir: Path, folders: Sequence[str], *, version: str, weight_format: str,
                        indexes: Sequence[str] = ("model_index.json",)) -> str:
    """16 hex chars over a converter version, the weight format and the files a conversion reads: the `indexes`
    and the configs, vocabularies and weights in `folders` (paths relative to `source_dir`)."""
    digest = hashlib.sha256(f"{version}\0{weight_format}\0".encode())
    for rel, file in _source_files(Path(source_dir), folders, indexes):
        # Length-prefix each part so that no two different folders can feed the same byte stream.
        digest.update(f"{rel}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _source_files(source_dir: Path, folders: Sequence[str] = SOURCE_COMPONENTS,
                  indexes: Sequence[str] = ("model_index.json",)) -> list[tuple[str, Path]]:
    files = [source_dir / index for index in indexes]
    for component in folders:
        folder = source_dir / component
        if folder.is_dir():
            files += [p for p in folder.rglob("*") if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES]
    # HF cache snapshots hold symlinks into blobs/: the relative name is the link's, the bytes the target's.
    return sorted((p.relative_to(source_dir).as_posix(), p) for p in files)


def convert_sd(source_dir: Path, out_dir: Path, *, weight_format: WeightFormat = "fp16") -> ConversionResult:
    """Convert an SD 1.x diffusers folder to OpenVINO IR in `out_dir` (replacing what is there)."""
    started = time.perf_counter()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    # 1. Check the request before the slow part.
    compress = check_weight_format(weight_format)
    check_sd_source(source_dir)
    fingerprint = fingerprint_source(source_dir, weight_format=weight_format)
    # 2. Everything goes into a temporary sibling folder; only a finished conversion is renamed into place.
    with staging(out_dir) as work:
        # 3. The small files: pipeline index, scheduler config, tokenizer.
        copy_pipeline_files(source_dir, work)
        if (source_dir / "scorer" / "config.json").is_file():  # a prompt-adherence scorer travels with the IR
            shutil.copytree(source_dir / "scorer", work / "scorer")
        # 4. One model at a time, each freed before the next is loaded (a full fp32 UNet is 3.4 GB). The
        #    explicit collection is needed: OpenVINO's TorchScript decoder leaves reference cycles that
        #    keep the traced torch model alive.
        for convert in (_convert_text_encoder, _convert_unet, _convert_vae):
            convert(source_dir, work, compress)
            gc.collect()
    # 5. Published by staging(): any previous result moved aside, the new one renamed in, the old deleted.
    return conversion_result(out_dir, "sd", fingerprint, started)


def check_weight_format(weight_format: str) -> bool:
    """Whether to compress weights to FP16; ValueError for a format no converter writes."""
    if weight_format not in ("fp16", "fp32"):
        raise ValueError(f"weight_format must be 'fp16' or 'fp32', not {weight_format!r}")
    return weight_format == "fp16"


@contextmanager
def staging(out_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `out_dir` to convert into, renamed into place only when the block completes and
    deleted when it fails: a reader never sees half a conversion."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    os.chmod(work, 0o755)  # mkdtemp makes it private; the published folder is an ordinary one
    try:
        yield work
        replace_dir(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def conversion_result(out_dir: Path, family: str, fingerprint: str, started: float) -> ConversionResult:
    files = tuple(sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file()))
    return ConversionResult(out_dir=out_dir, family=family, fingerprint=fingerprint, files=files,
                            seconds=round(time.perf_counter() - started, 3))


def check_sd_source(source_dir: Path) -> dict[str, Any]:
    """The source's model_index.json, if it is an SD 1.x-style pipeline this module converts."""
    index_path = Path(source_dir) / "model_index.json"
    if not index_path.is_file():
        raise SourceNotFound(f"{source_dir} is not a diffusers model folder (no model_index.json)")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    missing = [c for c in SOURCE_COMPONENTS if not (Path(source_dir) / c).is_dir()]
    if missing or "text_encoder_2" in index:
        kind = index.get("_class_name", "unknown pipeline")
        why = f"missing {', '.join(missing)}" if missing else "it has a second text encoder"
        raise ValueError(f"{source_dir} ({kind}) is not a Stable Diffusion 1.x model: {why}")
    return index


def replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`, replacing a previous `target` only once the new one is in place."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{new.name}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def copy_pipeline_files(source_dir: Path, work: Path, tokenizers: Sequence[str] = ("tokenizer",)) -> None:
    """The small files every SD-style IR folder carries: model_index.json, the scheduler config, the tokenizers."""
    shutil.copyfile(source_dir / "model_index.json", work / "model_index.json")
    (work / "scheduler").mkdir()
    shutil.copyfile(source_dir / "scheduler" / "scheduler_config.json", work / "scheduler" / "scheduler_config.json")
    for tokenizer in tokenizers:
        _save_tokenizer(source_dir / tokenizer, work / tokenizer)


def _save_tokenizer(source: Path, target: Path) -> None:
    from transformers import CLIPTokenizer

    # Loaded and saved rather than copied: a vocab.json/merges.txt folder comes out with a tokenizer.json.
    CLIPTokenizer.from_pretrained(source).save_pretrained(target)


def _convert_text_encoder(source_dir: Path, work: Path, compress: bool) -> None:
    import openvino as ov
    import torch
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(source_dir / "text_encoder", dtype=torch.float32).eval()

    def forward(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=input_ids)
        return out.last_hidden_state, out.pooler_output

    example = (torch.ones((1, TEXT_LENGTH), dtype=torch.int64),)
    _export(_module(model, forward), example, {"input_ids": ov.PartialShape([-1, -1])},
            ("last_hidden_state", "pooler_output"), work / "text_encoder", compress)
    shutil.copyfile(source_dir / "text_encoder" / "config.json", work / "text_encoder" / "config.json")


def _convert_unet(source_dir: Path, work: Path, compress: bool) -> None:
    import openvino as ov
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(source_dir, subfolder="unet", torch_dtype=torch.float32)
    unet.eval()
    channels, context = unet.config.in_channels, unet.config.cross_attention_dim

    def forward(sample: torch.Tensor, timestep: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return unet(sample, timestep, encoder_hidden_states=states, return_dict=False)[0]

    # A latent side that is NOT a multiple of the UNet's overall up factor makes diffusers take (and the
    # trace record) its explicit-size upsampling path. Traced at a multiple, the IR fails to compile for
    # sizes that are multiples of 8 but not of 64 (e.g. 520x520), which diffusers renders fine.
    side = 2**unet.num_upsamplers + 1
    # The timestep is float32 of shape [1]: LMS and Euler use fractional timesteps, which must stay exact.
    example = (torch.randn(2, channels, side, side), torch.tensor([999.0], dtype=torch.float32),
               torch.randn(2, TEXT_LENGTH, context))
    shapes = {"sample": ov.PartialShape([-1, channels, -1, -1]), "timestep": ov.PartialShape([-1]),
              "encoder_hidden_states": ov.PartialShape([-1, -1, context])}
    _export(_module(unet, forward), example, shapes, ("out_sample",), work / "unet", compress)
    shutil.copyfile(source_dir / "unet" / "config.json", work / "unet" / "config.json")


def _convert_vae(source_dir: Path, work: Path, compress: bool) -> None:
    import openvino as ov
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(source_dir, subfolder="vae", torch_dtype=torch.float32).eval()
    latent, image = vae.config.latent_channels, vae.config.in_channels
    scale = 2 ** (len(vae.config.block_out_channels) - 1)

    def decode(latent_sample: torch.Tensor) -> torch.Tensor:
        return vae.decode(latent_sample, return_dict=False)[0]

    def encode(sample: torch.Tensor) -> torch.Tensor:
        # The distribution's parameters (mean and log-variance), as optimum exports them: sampling stays
        # with the caller, who owns the generator.
        return vae.encode(sample).latent_dist.parameters

    _export(_module(vae, decode), (torch.randn(1, latent, 8, 8),),
            {"latent_sample": ov.PartialShape([-1, latent, -1, -1])}, ("sample",), work / "vae_decoder",
            compress)
    _export(_module(vae, encode), (torch.randn(1, image, 8 * scale, 8 * scale),),
            {"sample": ov.PartialShape([-1, image, -1, -1])}, ("latent_parameters",), work / "vae_encoder",
            compress)
    for folder in ("vae_decoder", "vae_encoder"):
        shutil.copyfile(source_dir / "vae" / "config.json", work / folder / "config.json")


def _export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], inputs: dict[str, ov.PartialShape],
            outputs: tuple[str, ...], folder: Path, compress: bool) -> None:
    """Trace `module`, name its inputs and outputs as optimum-intel does, and save it as IR in `folder`."""
    import openvino as ov
    import torch
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript tracing warns about its deprecation and about Python branches it freezes; both are
        # expected here (the branches are on static configuration, and the example shapes pick the general
        # upsampling path).
        warnings.simplefilter("ignore")
        # OpenVINO's own tracer, minus torch's trace check (a second trace and run, a third of the time):
        # the parity tests against diffusers check the converted models instead.
        decoder = TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})
        model = ov.convert_model(decoder, example_input=example, input=list(inputs.values()))
    for port, name in zip(model.inputs, inputs, strict=True):
        port.get_tensor().set_names({name})
        port.get_node().set_friendly_name(name)
    for port, name in zip(model.outputs, outputs, strict=True):
        port.get_tensor().set_names({name})
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, folder / MODEL_XML, compress_to_fp16=compress)


def _module(owner: torch.nn.Module, forward: Callable[..., Any]) -> torch.nn.Module:
    """`forward` as the forward of an nn.Module owning `owner`'s weights: what the tracer takes."""
    return _export_module_class()(owner, forward)


@lru_cache(maxsize=1)
def _export_module_class() -> type[torch.nn.Module]:
    # Defined on first use, so that importing this module does not import torch.
    import torch

    class Export(torch.nn.Module):
        def __init__(self, owner: torch.nn.Module, forward: Callable[..., Any]) -> None:
            super().__init__()
            self.owner = owner
            self.fn = forward

        def forward(self, *args: torch.Tensor) -> Any:
            return self.fn(*args)

    return Export
