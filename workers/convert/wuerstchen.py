"""Wuerstchen (v2) from a diffusers folder to OpenVINO IR: both text encoders, the prior, the decoder, the VQGAN.

Accepted sources (diffusers 0.42 keeps Wuerstchen under `diffusers.pipelines.deprecated` and cannot load a saved
WuerstchenCombinedPipeline whole, so every component is loaded from its own subfolder):

- a combined folder, as `WuerstchenCombinedPipeline.save_pretrained` writes it: model_index.json of class
  WuerstchenCombinedPipeline, prior_tokenizer/ prior_text_encoder/ prior_prior/ prior_scheduler/ (stage C) and
  tokenizer/ text_encoder/ decoder/ scheduler/ vqgan/ (stages B and A);
- a WuerstchenDecoderPipeline folder (as warp-ai/wuerstchen) with its WuerstchenPriorPipeline folder (as
  warp-ai/wuerstchen-prior) copied into a `prior/` subfolder. On the Hub the two are separate repos joined by the
  model card; darkroom reads only local folders for them.

The IR is always the combined layout (optimum-intel has no Wuerstchen export, so the names follow diffusers'
components and optimum's input names where there is a counterpart):

    model_index.json (WuerstchenCombinedPipeline, plus the pipeline constants the OpenVINO pipeline reads:
                      resolution_multiple, latent_mean, latent_std, latent_dim_scale)
    prior_tokenizer/, prior_scheduler/, tokenizer/, scheduler/
    prior_text_encoder/openvino_model.{xml,bin}  input_ids, attention_mask -> last_hidden_state
    prior_prior/openvino_model.{xml,bin}         sample, timestep_ratio, encoder_hidden_states -> out_sample
    text_encoder/openvino_model.{xml,bin}        input_ids, attention_mask -> last_hidden_state
    decoder/openvino_model.{xml,bin}             sample, timestep_ratio, effnet, encoder_hidden_states -> out_sample
    vqgan/openvino_model.{xml,bin}               latent_sample -> sample (the VQGAN's decoder only)

Wuerstchen's text encoders take the attention mask (diffusers passes it), and the prior reads every one of the 77
hidden states, padding included, so the mask is an input of the IR.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.families import WUERSTCHEN
from workers.convert.sd import (
    TEXT_LENGTH,
    ConversionResult,
    SourceNotFound,
    WeightFormat,
    _export,
    _module,
    _save_tokenizer,
    check_weight_format,
    conversion_result,
    fingerprint_folders,
    staging,
)
from workers.pipelines.wuerstchen import PIPELINE_CONSTANTS

if TYPE_CHECKING:
    import torch

# Part of every Wuerstchen fingerprint: bump it when the IR this module writes changes.
CONVERTER_VERSION = "darkroom-wuerstchen-ir-1"
COMBINED_CLASS = "WuerstchenCombinedPipeline"
DECODER_CLASS = "WuerstchenDecoderPipeline"
PRIOR_CLASS = "WuerstchenPriorPipeline"
# The IR's components (diffusers' combined names), each with its folder in a combined source.
COMPONENTS = ("prior_tokenizer", "prior_text_encoder", "prior_prior", "prior_scheduler",
              "tokenizer", "text_encoder", "decoder", "scheduler", "vqgan")
# In a decoder folder the prior pipeline's components sit in prior/ under their own pipeline's names.
_IN_PRIOR_FOLDER = {"prior_tokenizer": "prior/tokenizer", "prior_text_encoder": "prior/text_encoder",
                    "prior_prior": "prior/prior", "prior_scheduler": "prior/scheduler"}


def source_layout(source_dir: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Each IR component's source folder, and the pipeline constants, for either accepted layout."""
    source_dir = Path(source_dir)
    index = _read_index(source_dir)
    kind = index.get("_class_name", "unknown pipeline")
    constants = {k: index.get(k, v) for k, v in PIPELINE_CONSTANTS.items()}
    folders = {c: source_dir / c for c in COMPONENTS}
    if kind == DECODER_CLASS:
        prior_index_path = source_dir / "prior" / "model_index.json"
        if not prior_index_path.is_file():
            raise ValueError(f"{source_dir} is a {DECODER_CLASS} without its prior: copy the "
                             f"{PRIOR_CLASS} folder (e.g. warp-ai/wuerstchen-prior) into {source_dir / 'prior'}, or "
                             f"give a {COMBINED_CLASS} folder")
        prior_index = _read_index(source_dir / "prior")
        if prior_index.get("_class_name") != PRIOR_CLASS:
            raise ValueError(f"{prior_index_path} is a {prior_index.get('_class_name')}, not a {PRIOR_CLASS}")
        constants.update({k: prior_index[k] for k in ("resolution_multiple", "latent_mean", "latent_std")
                          if k in prior_index})
        folders.update({c: source_dir / rel for c, rel in _IN_PRIOR_FOLDER.items()})
    elif kind != COMBINED_CLASS:
        raise ValueError(f"{source_dir} ({kind}) is not a Wuerstchen model: expected a {COMBINED_CLASS} or a "
                         f"{DECODER_CLASS} with its prior in prior/")
    missing = [folder.relative_to(source_dir).as_posix() for folder in folders.values() if not folder.is_dir()]
    if missing:
        raise ValueError(f"{source_dir} ({kind}) is not a complete Wuerstchen model: missing {', '.join(missing)}")
    return folders, constants


def fingerprint_wuerstchen(source_dir: Path, *, weight_format: str) -> str:
    """16 hex chars identifying what a conversion of `source_dir` would produce."""
    source_dir = Path(source_dir)
    folders, _ = source_layout(source_dir)
    indexes = ["model_index.json"] + (["prior/model_index.json"] if (source_dir / "prior").is_dir() else [])
    return fingerprint_folders(source_dir, [f.relative_to(source_dir).as_posix() for f in folders.values()],
                               version=CONVERTER_VERSION, weight_format=weight_format, indexes=indexes)


def convert_wuerstchen(source_dir: Path, out_dir: Path, *, weight_format: WeightFormat = "fp16") -> ConversionResult:
    """Convert a Wuerstchen diffusers folder to OpenVINO IR in `out_dir` (replacing what is there)."""
    started = time.perf_counter()
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    compress = check_weight_format(weight_format)
    folders, constants = source_layout(source_dir)
    fingerprint = fingerprint_wuerstchen(source_dir, weight_format=weight_format)
    with staging(out_dir) as work:
        index = {"_class_name": COMBINED_CLASS, **_components_index(source_dir), **constants}
        (work / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for scheduler in ("prior_scheduler", "scheduler"):
            (work / scheduler).mkdir()
            shutil.copyfile(folders[scheduler] / "scheduler_config.json", work / scheduler / "scheduler_config.json")
        for tokenizer in ("prior_tokenizer", "tokenizer"):
            _save_tokenizer(folders[tokenizer], work / tokenizer)
        # One model at a time, each freed before the next (the real decoder and prior are several GB in fp32).
        for encoder in ("prior_text_encoder", "text_encoder"):
            _convert_text_encoder(folders[encoder], work / encoder, compress)
            gc.collect()
        for convert, component in ((_convert_prior, "prior_prior"), (_convert_decoder, "decoder"),
                                   (_convert_vqgan, "vqgan")):
            convert(folders[component], work / component, compress)
            shutil.copyfile(folders[component] / "config.json", work / component / "config.json")
            gc.collect()
    return conversion_result(out_dir, WUERSTCHEN, fingerprint, started)


def _read_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    if not path.is_file():
        raise SourceNotFound(f"{folder} is not a diffusers model folder (no model_index.json)")
    return json.loads(path.read_text(encoding="utf-8"))


def _components_index(source_dir: Path) -> dict[str, Any]:
    """The combined pipeline's component entries, from the source's index (and its prior's, in prior/)."""
    index = _read_index(source_dir)
    entries = {k: v for k, v in index.items() if k in COMPONENTS or k == "_diffusers_version"}
    if (source_dir / "prior" / "model_index.json").is_file():
        prior = _read_index(source_dir / "prior")
        entries.update({f"prior_{k}": v for k, v in prior.items() if f"prior_{k}" in COMPONENTS})
    return entries


def _load_model(folder: Path) -> Any:
    """The Wuerstchen model class named by a component's config.json, loaded in fp32 from that folder."""
    import torch
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

    classes = {c.__name__: c for c in (PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior)}
    name = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_class_name", "")
    if name not in classes:
        raise ValueError(f"{folder}: a {name or 'model without _class_name'}, expected one of {', '.join(classes)}")
    return classes[name].from_pretrained(folder, torch_dtype=torch.float32).eval()


def _convert_text_encoder(source: Path, target: Path, compress: bool) -> None:
    import openvino as ov
    import torch
    from transformers import CLIPTextModel

    # A CLIPTextModelWithProjection checkpoint loads too: only the hidden states are used.
    model = CLIPTextModel.from_pretrained(source, dtype=torch.float32).eval()

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((1, TEXT_LENGTH), dtype=torch.int64)
    mask = torch.cat([torch.ones((1, 5), dtype=torch.int64), torch.zeros((1, TEXT_LENGTH - 5), dtype=torch.int64)], 1)
    shapes = {"input_ids": ov.PartialShape([-1, -1]), "attention_mask": ov.PartialShape([-1, -1])}
    _export(_module(model, forward), (ids, mask), shapes, ("last_hidden_state",), target, compress)
    shutil.copyfile(source / "config.json", target / "config.json")


def _convert_prior(source: Path, target: Path, compress: bool) -> None:
    import openvino as ov
    import torch

    prior = _load_model(source)
    channels, context = prior.config.c_in, prior.config.c_cond

    def forward(sample: torch.Tensor, timestep_ratio: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return prior(sample, r=timestep_ratio, c=states)

    example = (torch.randn(2, channels, 3, 3), torch.tensor([0.75, 0.75]), torch.randn(2, TEXT_LENGTH, context))
    shapes = {"sample": ov.PartialShape([-1, channels, -1, -1]), "timestep_ratio": ov.PartialShape([-1]),
              "encoder_hidden_states": ov.PartialShape([-1, -1, context])}
    _export(_module(prior, forward), example, shapes, ("out_sample",), target, compress)


def _convert_decoder(source: Path, target: Path, compress: bool) -> None:
    import openvino as ov
    import torch

    decoder = _load_model(source)
    config = decoder.config
    channels, embedding, context = config.c_in, config.effnet_embd, config.clip_embd

    def forward(sample: torch.Tensor, timestep_ratio: torch.Tensor, effnet: torch.Tensor,
                states: torch.Tensor) -> torch.Tensor:
        return decoder(sample, r=timestep_ratio, effnet=effnet, clip=states)

    # A 128x128 image's shapes: the embeddings are resized up for some levels and down for others, as at 1024.
    side = config.patch_size * 2 ** (len(config.c_hidden) - 1) * 2
    example = (torch.randn(2, channels, side, side), torch.tensor([0.75, 0.75]), torch.randn(2, embedding, 3, 3),
               torch.randn(2, TEXT_LENGTH, context))
    shapes = {"sample": ov.PartialShape([-1, channels, -1, -1]), "timestep_ratio": ov.PartialShape([-1]),
              "effnet": ov.PartialShape([-1, embedding, -1, -1]),
              "encoder_hidden_states": ov.PartialShape([-1, -1, context])}
    with _exact_aa_bicubic():
        _export(_module(decoder, forward), example, shapes, ("out_sample",), target, compress)


def _convert_vqgan(source: Path, target: Path, compress: bool) -> None:
    import openvino as ov
    import torch

    vqgan = _load_model(source)
    latent = vqgan.config.latent_channels

    def decode(latent_sample: torch.Tensor) -> torch.Tensor:
        # force_not_quantize (diffusers' default): the decoder takes the latents as they are, no codebook lookup.
        return vqgan.decode(latent_sample, return_dict=False)[0]

    _export(_module(vqgan, decode), (torch.randn(1, latent, 8, 8),),
            {"latent_sample": ov.PartialShape([-1, latent, -1, -1])}, ("sample",), target, compress)


@contextmanager
def _exact_aa_bicubic() -> Iterator[None]:
    """Trace the decoder's resizing of the prior's embeddings as `aa_bicubic`, not as interpolate's own op.

    The decoder resizes with F.interpolate(mode="bicubic", antialias=True, align_corners=True). OpenVINO 2026.4
    converts that combination wrongly (up to 1.5 off on unit-scale inputs, enlarging or shrinking; without
    antialias, or without align_corners, it is exact), so for the trace it is replaced by the same arithmetic.
    """
    import torch.nn.functional as F

    original = F.interpolate

    def interpolate(input: torch.Tensor, size: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (size is not None and not args and kwargs.get("mode") == "bicubic" and kwargs.get("antialias")
                and kwargs.get("align_corners")):
            return aa_bicubic(input, size)
        return original(input, size, *args, **kwargs)

    F.interpolate = interpolate
    try:
        yield
    finally:
        F.interpolate = original


def aa_bicubic(x: torch.Tensor, size: Any) -> torch.Tensor:
    """PyTorch's antialiased bicubic resize with align_corners=True, as two matrix products (separable weights).

    Its arithmetic (aten's _upsample_bicubic2d_aa): Keys' cubic with a = -0.5, the align-corners scale
    (in - 1) / (out - 1) with half-pixel centres, the kernel widened by the scale when shrinking, each row of
    weights normalised. The sizes stay tensors, so a traced graph keeps them dynamic; OpenVINO folds the weights
    to constants once the shapes are static.
    """
    import torch

    shape = torch._shape_as_tensor(x)
    rows = _aa_weights(shape[2], torch.as_tensor(size[0]), x.dtype)
    cols = _aa_weights(shape[3], torch.as_tensor(size[1]), x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def _aa_weights(in_size: torch.Tensor, out_size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import torch

    n_in, n_out = in_size.to(dtype), out_size.to(dtype)
    scale = torch.where(n_out > 1, (n_in - 1) / (n_out - 1).clamp(min=1), torch.zeros_like(n_in))
    inverse = torch.where(scale >= 1, 1 / scale.clamp(min=1e-12), torch.ones_like(scale))
    centres = scale * (torch.arange(out_size, dtype=dtype) + 0.5)
    t = ((torch.arange(in_size, dtype=dtype)[None, :] + 0.5 - centres[:, None]) * inverse).abs()
    a = -0.5
    weights = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                          torch.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, torch.zeros_like(t)))
    total = weights.sum(1, keepdim=True)
    return weights / torch.where(total != 0, total, torch.ones_like(total))
