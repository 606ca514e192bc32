"""Conversion to OpenVINO IR in optimum-intel's layout, source fingerprints and resolution, CLIP's tokenizer.

Real conversions of the tiny random-weight models, read back and compiled by a real OpenVINO runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testkit.tiny_models import build_tiny_sd
from workers.convert.sd import ConversionResult, SourceNotFound, convert_sd, fingerprint_source, resolve_source
from workers.demo_model.clip_vocab import clip_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# optimum-intel's names (optimum/exporters/onnx model configs), which optimum-intel and openvino-genai expect.
IO_NAMES = {
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
    "vae_encoder": (["sample"], ["latent_parameters"]),
}


@pytest.fixture(scope="module")
def converted(tiny_bksdm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ConversionResult:
    # fp16, the default a convert job uses (the fp32 parity path is exercised by test_sd_pipeline).
    return convert_sd(tiny_bksdm_dir, tmp_path_factory.mktemp("ir") / "bk-sdm-fp16", weight_format="fp16")


def test_layout_follows_optimum_intel(converted: ConversionResult) -> None:
    out = converted.out_dir
    expected = {"model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"}
    for model in MODELS:
        expected |= {f"{model}/openvino_model.xml", f"{model}/openvino_model.bin", f"{model}/config.json"}
    assert expected <= set(converted.files)
    assert all((out / f).is_file() for f in converted.files)
    assert converted.family == "sd" and converted.seconds > 0
    # Nothing half-finished is left beside the result.
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    # The VAE configs carry what a worker needs for shapes (8x downsampling) and latent scaling.
    vae = json.loads((out / "vae_decoder" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4 and "scaling_factor" in vae


def test_ir_names_and_dynamic_shapes(converted: ConversionResult) -> None:
    import openvino as ov

    core = ov.Core()
    for model_name, (inputs, outputs) in IO_NAMES.items():
        model = core.read_model(converted.out_dir / model_name / "openvino_model.xml")
        assert [p.get_any_name() for p in model.inputs] == inputs, model_name
        assert [p.get_any_name() for p in model.outputs] == outputs, model_name
        # Batch and spatial sizes stay dynamic; workers reshape to a static size before compiling.
        assert model.inputs[0].get_partial_shape()[0].is_dynamic, model_name
    unet = core.read_model(converted.out_dir / "unet" / "openvino_model.xml")
    timestep = unet.input("timestep")
    assert timestep.get_element_type() == ov.Type.f32 and timestep.get_partial_shape().rank.get_length() == 1
    sample = unet.input("sample").get_partial_shape()
    assert sample[2].is_dynamic and sample[3].is_dynamic


def test_fp16_weights_are_compressed_and_run(converted: ConversionResult) -> None:
    from workers.pipelines.sd import OVStableDiffusion

    xml = (converted.out_dir / "unet" / "openvino_model.xml").read_text()
    assert 'element_type="f16"' in xml
    pipe = OVStableDiffusion.load(converted.out_dir, width=64, height=64, cfg=True,
                                  ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    out = pipe.generate("a dog wearing hat", steps=2, guidance_scale=7.5, scheduler="euler", seed=1)
    assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8 and out.image.std() > 1


def test_failed_conversion_leaves_nothing(tiny_bksdm_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bksdm_dir, broken)
    # The first model converted fails to load, so the test is quick; the tokenizer was written already.
    (broken / "text_encoder" / "model.safetensors").unlink()
    out = tmp_path / "out" / "ir"
    with pytest.raises(OSError):
        convert_sd(broken, out, weight_format="fp32")
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_fingerprint_is_stable_and_tracks_weights_and_format(tiny_bksdm_dir: Path, tmp_path: Path,
                                                            converted: ConversionResult) -> None:
    first = fingerprint_source(tiny_bksdm_dir, weight_format="fp16")
    assert len(first) == 16 and int(first, 16) >= 0
    assert fingerprint_source(tiny_bksdm_dir, weight_format="fp16") == first == converted.fingerprint
    # Relative paths, not locations: a copy of the folder is the same model.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bksdm_dir, copy)
    assert fingerprint_source(copy, weight_format="fp16") == first
    assert fingerprint_source(copy, weight_format="fp32") != first
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    assert fingerprint_source(copy, weight_format="fp16") != first


def test_tiny_models_are_deterministic(tiny_bksdm_dir: Path, tmp_path: Path) -> None:
    # Same seed, same bytes: a re-run demo finds its model already converted (same fingerprint).
    again = build_tiny_sd(tmp_path / "again", seed=0, variant="bk-sdm")
    other = build_tiny_sd(tmp_path / "other", seed=1, variant="bk-sdm")
    reference = fingerprint_source(tiny_bksdm_dir, weight_format="fp32")
    assert fingerprint_source(again, weight_format="fp32") == reference
    assert fingerprint_source(other, weight_format="fp32") != reference
    assert build_tiny_sd(again, seed=5) == again  # an existing model is returned, not rebuilt
    assert fingerprint_source(again, weight_format="fp32") == reference
    with pytest.raises(ValueError, match="variant"):
        build_tiny_sd(tmp_path / "bad", variant="sdxl")  # type: ignore[arg-type]


def test_clip_tokenizer_has_the_real_vocabulary() -> None:
    tokenizer = clip_tokenizer()
    assert tokenizer("a dog wearing hat").input_ids == [49406, 320, 1929, 3309, 3801, 49407]
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    padded = tokenizer("a dog", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.pad_token_id == 49407


def test_resolve_local_folder(tiny_bksdm_dir: Path, tmp_path: Path) -> None:
    assert resolve_source(str(tiny_bksdm_dir)) == tiny_bksdm_dir.resolve()
    with pytest.raises(SourceNotFound, match="model_index.json"):
        resolve_source(str(tmp_path))


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(SourceNotFound, match="no-such-model"):
        resolve_source(missing)
    with pytest.raises(SourceNotFound, match="not a Hugging Face repo id"):
        resolve_source("not a repo id!")


def _fake_hub_cache(hub: Path, repo_id: str, model_dir: Path) -> Path:
    """huggingface_hub's cache layout by hand: content-addressed blobs, a snapshot of symlinks, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    for file in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_resolve_hugging_face_cache_offline(tiny_bksdm_dir: Path, tmp_path: Path) -> None:
    hf_home = tmp_path / "hf"
    snapshot = _fake_hub_cache(hf_home / "hub", "darkroom-test/tiny-bk-sdm", tiny_bksdm_dir)
    # A fresh process, as a worker starts: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE at import.
    script = (
        "import json\n"
        "from workers.convert.sd import SourceNotFound, resolve_source\n"
        "found = str(resolve_source('darkroom-test/tiny-bk-sdm'))\n"
        "try:\n"
        "    resolve_source('darkroom-test/not-cached')\n"
        "    missing = ''\n"
        "except SourceNotFound as exc:\n"
        "    missing = str(exc)\n"
        "print(json.dumps({'found': found, 'missing': missing}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["found"]) == snapshot
    assert "darkroom-test/not-cached" in result["missing"]
    # Symlinked blobs fingerprint like the folder they were made from.
    assert fingerprint_source(snapshot, weight_format="fp16") == fingerprint_source(tiny_bksdm_dir,
                                                                                    weight_format="fp16")


def test_worker_modules_import_without_celery_or_heavy_libraries() -> None:
    code = (
        "import sys, workers.convert.sd, workers.pipelines.sd, workers.pipelines.schedulers, testkit.tiny_models\n"
        "heavy = {'celery', 'torch', 'openvino', 'diffusers'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
