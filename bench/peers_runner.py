"""The benchmark's runners in the peers' venv (bench/.venv-peers: optimum-intel, openvino-genai and the older
transformers and diffusers they pin). Called one per process by bench/peers.py:
`bench/.venv-peers/bin/python bench/peers_runner.py NAME PARAMS_JSON OUT_JSON` (see bench/common.py).

- build: the model's diffusers folder, written by this venv's own diffusers/transformers (bench/models.py);
- export: optimum-intel's OpenVINO export of that folder, plus openvino-tokenizers' tokenizer and detokenizer
  IRs (openvino-genai needs them);
- optimum: OVStableDiffusionPipeline on the export, reshaped static (batch 1, the size) and compiled;
- genai: openvino_genai.Text2ImagePipeline on the same export, reshaped and compiled.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from common import GUIDANCE, NEGATIVE, PROMPT, Params, Result, StepTimer, measure, runner_main, summarize  # noqa: E402
from models import build_pipeline_folder  # noqa: E402


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("optimum-intel", "optimum", "openvino", "openvino-genai", "openvino-tokenizers", "diffusers",
             "transformers", "torch")
    return {name: version(name) for name in names}


def build(p: Params) -> Result:
    folder = build_pipeline_folder(Path(p["out"]), p["model"], seed=p["seed"])
    return {"folder": str(folder), "versions": versions()}


def export(p: Params) -> Result:
    """optimum-intel's export (FP16-compressed weights, no 8-bit weight compression), then the tokenizer IRs."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from optimum.intel import OVStableDiffusionPipeline
    from transformers import CLIPTokenizer

    out = Path(p["out"])
    if (out / "tokenizer" / "openvino_tokenizer.xml").is_file():
        return {"exported": str(out), "export_s": None, "cached": True}
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    pipe = OVStableDiffusionPipeline.from_pretrained(p["source"], export=True, compile=False, load_in_8bit=False)
    pipe.save_pretrained(partial)
    del pipe
    export_s = time.perf_counter() - started
    tokenizer_dir = partial / "tokenizer"
    if not (tokenizer_dir / "openvino_tokenizer.xml").is_file():
        ov_tokenizer, ov_detokenizer = convert_tokenizer(CLIPTokenizer.from_pretrained(tokenizer_dir),
                                                         with_detokenizer=True)
        ov.save_model(ov_tokenizer, tokenizer_dir / "openvino_tokenizer.xml")
        ov.save_model(ov_detokenizer, tokenizer_dir / "openvino_detokenizer.xml")
    partial.rename(out)
    return {"exported": str(out), "export_s": round(export_s, 1), "versions": versions()}


def optimum(p: Params) -> Result:
    import torch
    from optimum.intel import OVStableDiffusionPipeline

    size = p["size"]
    pipe = OVStableDiffusionPipeline.from_pretrained(p["exported"], compile=False)
    pipe.reshape(batch_size=1, height=size, width=size, num_images_per_prompt=1)
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)
    timer = StepTimer()
    pipe.unet.forward = timer.wrap(pipe.unet.forward)

    def generate(seed: int, steps: int) -> None:
        pipe(PROMPT, negative_prompt=NEGATIVE or None, num_inference_steps=steps, guidance_scale=GUIDANCE,
             height=size, width=size, output_type="np", generator=torch.Generator().manual_seed(seed))

    return {**measure(generate, timer, p, p["say"]), "versions": versions()}


def genai(p: Params) -> Result:
    """Per UNet step: genai's own perf metrics (UNet inference durations) when it reports them."""
    import openvino_genai

    size = p["size"]
    pipe = openvino_genai.Text2ImagePipeline(p["exported"])
    pipe.reshape(1, size, size, GUIDANCE)
    pipe.compile("CPU")
    unet_ms: list[float] = []

    def generate(seed: int, steps: int) -> None:
        pipe.generate(PROMPT, negative_prompt=NEGATIVE, width=size, height=size, num_inference_steps=steps,
                      guidance_scale=GUIDANCE, num_images_per_prompt=1,
                      generator=openvino_genai.TorchGenerator(seed))
        try:
            raw = pipe.get_performance_metrics().raw_metrics
            unet_ms.extend(float(us) / 1000 for us in raw.unet_inference_durations)
        except AttributeError:  # an openvino-genai without per-call UNet metrics: per-image times only
            pass

    for i in range(p["warmup"]):
        generate(1000 + i, p["warmup_steps"])
    unet_ms.clear()
    image_s = []
    for i in range(p["runs"]):
        started = time.perf_counter()
        generate(i, p["steps"])
        image_s.append(time.perf_counter() - started)
        p["say"](f"image {i + 1}/{p['runs']}: {image_s[-1]:.2f} s")
    return {**summarize(image_s, unet_ms), "versions": versions()}


RUNNERS = {"build": build, "export": export, "optimum": optimum, "genai": genai}

if __name__ == "__main__":
    sys.exit(runner_main(RUNNERS))
