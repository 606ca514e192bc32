"""NNCF calibration and measurement on the tiny SD model: real OpenVINO, real NNCF, real `datasets`.

Each mode writes a complete IR folder that the pipeline loads and renders; the UNet of "int8" really holds
quantization, "weights-int8" really holds int8 weights; measure() tells an artifact from itself and from
its INT8 copy; prompts load from the shipped set and from local datasets, and bad data fails clearly.
"""

from __future__ import annotations

import collections
import filecmp
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from testkit.tiny_models import build_tiny_sd
from workers.calibrate.dataset import DEFAULT_PROMPTS, CalibrationDataError, load_calibration_prompts
from workers.calibrate.quantize import (
    MEMORY_FACTOR_ENV,
    MODES,
    PSNR_CAP_DB,
    VALIDATION_SET,
    CalibrationResult,
    available_memory,
    calibrate_sd,
    estimate_peak_memory,
    measure,
    package_versions,
)
from workers.convert.sd import convert_sd
from workers.pipelines.sd import OVStableDiffusion

PROMPTS = ("a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen")
SIZE = 64
STEPS = 3
SUBSET = 7  # of 9 recorded UNet calls (3 prompts x 3 steps): exercises the spread pick

Calibrate = Callable[[str], CalibrationResult]


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = build_tiny_sd(tmp_path_factory.mktemp("calibrate-src") / "m")
    return convert_sd(source, tmp_path_factory.mktemp("calibrate-fp") / "fp", weight_format="fp32").out_dir


@pytest.fixture(scope="module")
def calibrated(fp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Calibrate:
    """Each mode's artifact, made once per module on first use."""
    made: dict[str, CalibrationResult] = {}

    def get(mode: str) -> CalibrationResult:
        if mode not in made:
            made[mode] = calibrate_sd(fp_dir, tmp_path_factory.mktemp(mode) / "int8", PROMPTS, mode=mode,
                                      steps=STEPS, width=SIZE, height=SIZE, subset_size=SUBSET)
        return made[mode]

    return get


def _ops(xml: Path) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Op types, and the element types of the constants, of one IR."""
    import openvino as ov

    model = ov.Core().read_model(xml)
    constants = (op for op in model.get_ops() if op.get_type_name() == "Constant")
    return (collections.Counter(op.get_type_name() for op in model.get_ops()),
            collections.Counter(op.get_element_type().get_type_name() for op in constants))


def _ir_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_writes_a_loadable_artifact(mode: str, fp_dir: Path, calibrated: Calibrate) -> None:
    result = calibrated(mode)
    assert result.mode == mode and result.seconds > 0
    # The same optimum layout as the source, file for file; nothing left beside it.
    assert list(result.files) == _ir_files(fp_dir) == _ir_files(result.out_dir)
    assert [p.name for p in result.out_dir.parent.iterdir()] == [result.out_dir.name]
    assert result.samples == (0 if mode == "weights-int8" else SUBSET)
    pipe = OVStableDiffusion.load(result.out_dir, width=SIZE, height=SIZE, cfg=True)
    image = pipe.generate(PROMPTS[0], steps=STEPS, guidance_scale=7.5, scheduler="pndm", seed=1).image
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8 and image.std() > 0


def test_int8_quantizes_the_unet_and_copies_the_rest(fp_dir: Path, calibrated: Calibrate) -> None:
    out = calibrated("int8").out_dir
    ops, constants = _ops(out / "unet" / "openvino_model.xml")
    # Activations get FakeQuantize ops; quantized weights are stored as int8 constants.
    assert ops["FakeQuantize"] > 10 and constants["i8"] > 10, (ops, constants)
    _, fp_constants = _ops(fp_dir / "unet" / "openvino_model.xml")
    assert fp_constants["i8"] == 0
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        for file in ("openvino_model.xml", "openvino_model.bin", "config.json"):
            assert filecmp.cmp(fp_dir / name / file, out / name / file, shallow=False), (name, file)


def test_weights_int8_compresses_every_model(fp_dir: Path, calibrated: Calibrate) -> None:
    out = calibrated("weights-int8").out_dir
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        ops, constants = _ops(out / name / "openvino_model.xml")
        assert ops["FakeQuantize"] == 0 and constants["u8"] > 0, (name, ops, constants)
        fp_size = (fp_dir / name / "openvino_model.bin").stat().st_size
        # An fp32 source: int8 weights with their scales and zero points take well under half.
        assert (out / name / "openvino_model.bin").stat().st_size < fp_size / 2, name


def test_hybrid_quantizes_the_unet_and_compresses_the_others(calibrated: Calibrate) -> None:
    out = calibrated("hybrid").out_dir
    ops, _ = _ops(out / "unet" / "openvino_model.xml")
    assert ops["FakeQuantize"] > 10
    for name in ("text_encoder", "vae_decoder", "vae_encoder"):
        ops, constants = _ops(out / name / "openvino_model.xml")
        assert ops["FakeQuantize"] == 0 and constants["u8"] > 0, name


def test_measure_tells_identical_from_quantized(fp_dir: Path, calibrated: Calibrate) -> None:
    pairs = VALIDATION_SET[:2]
    kwargs = {"width": SIZE, "height": SIZE, "steps": STEPS, "validation": pairs, "repeats": 2}
    same = measure(fp_dir, fp_dir, **kwargs)
    assert same.max_pixel_diff == 0 and same.psnr_db == same.min_psnr_db == PSNR_CAP_DB
    assert same.size_ratio == same.unet_size_ratio == 1.0 and same.fp_bytes == same.int8_bytes
    quantized = measure(fp_dir, calibrated("int8").out_dir, **kwargs)
    assert quantized.validation == pairs == same.validation
    assert quantized.max_pixel_diff > 0 and 0 < quantized.min_psnr_db <= quantized.psnr_db < PSNR_CAP_DB
    assert 0 < quantized.unet_size_ratio < 1 and 0 < quantized.size_ratio < 1
    assert quantized.unet_int8_bytes < quantized.unet_fp_bytes
    for figures in (same, quantized):
        assert set(figures.unet_step_ms) == {"fp32", "default", "int8"} and min(figures.unet_step_ms.values()) > 0
        assert set(figures.image_s) == {"default", "int8"} and min(figures.image_s.values()) > 0
        assert figures.unet_speedup > 0 and figures.image_speedup > 0
        json.dumps(asdict(figures), allow_nan=False)  # the report stays valid JSON


def test_failed_calibration_leaves_nothing(fp_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown calibration mode 'int4'"):
        calibrate_sd(fp_dir, tmp_path / "out", PROMPTS, mode="int4", steps=STEPS, width=SIZE, height=SIZE)
    assert list(tmp_path.iterdir()) == []
    # A failure halfway (the last model is unreadable): no partial folder, and a previous result survives.
    broken = tmp_path / "broken"
    shutil.copytree(fp_dir, broken)
    (broken / "vae_encoder" / "openvino_model.xml").write_text("<net>not a model", encoding="utf-8")
    previous = tmp_path / "out"
    previous.mkdir()
    (previous / "keep").write_text("previous result", encoding="utf-8")
    with pytest.raises(RuntimeError):
        calibrate_sd(broken, previous, (), mode="weights-int8", steps=STEPS, width=SIZE, height=SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]
    assert [p.name for p in previous.iterdir()] == ["keep"]


def test_default_prompts_are_shipped_and_cut() -> None:
    shipped = [line.strip() for line in DEFAULT_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(shipped) >= 32 and len(set(shipped)) == len(shipped)
    every = load_calibration_prompts(None, 1000)
    assert every.prompts == tuple(shipped) and every.source.endswith("calibration_prompts.txt")
    five = load_calibration_prompts(None, 5)
    assert five.prompts == tuple(shipped[:5])
    assert len(five.fingerprint) == 16 and five.fingerprint != every.fingerprint
    assert load_calibration_prompts(None, 5).fingerprint == five.fingerprint


def test_prompts_from_a_jsonl_text_column(tmp_path: Path) -> None:
    rows = [{"text": "a cat"}, {"text": "   "}, {"text": "a dog"}, {"text": "a cow"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    loaded = load_calibration_prompts(str(path), 2)
    assert loaded.prompts == ("a cat", "a dog") and loaded.source == str(path)
    # The fingerprint is of the prompts, wherever they came from.
    other = tmp_path / "same.csv"
    other.write_text("prompt,id\na cat,1\na dog,2\n", encoding="utf-8")
    assert load_calibration_prompts(str(other), 2).fingerprint == loaded.fingerprint


def test_prompts_from_a_save_to_disk_folder(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    captions = [f"caption number {i}" for i in range(10)]
    Dataset.from_dict({"id": list(range(10)), "caption": captions}).save_to_disk(tmp_path / "flat")
    assert load_calibration_prompts(str(tmp_path / "flat"), 4).prompts == tuple(captions[:4])
    DatasetDict({"train": Dataset.from_dict({"prompt": captions})}).save_to_disk(tmp_path / "splits")
    assert load_calibration_prompts(str(tmp_path / "splits"), 20).prompts == tuple(captions)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.jsonl", None, "no such file or folder"),
    ("empty.jsonl", "", "the file is empty"),
    ("nocolumn.jsonl", '{"title": "a cat"}\n', "no prompt column: expected one of prompt, text, caption, "
                                                 "found title"),
    ("malformed.jsonl", '{"text": "a cat"}\n{"text": oops\n', "could not be read"),
    ("blank.jsonl", '{"prompt": ""}\n{"prompt": "  "}\n', "holds no non-empty prompts"),
])
def test_bad_datasets_fail_clearly(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=message) as info:
        load_calibration_prompts(str(path), 8)
    assert str(path) in str(info.value)  # the message names the dataset


def test_an_empty_dataset_name_is_refused() -> None:
    # Path("") is the working directory: it must not be read as a folder of data files.
    with pytest.raises(CalibrationDataError, match="the name is empty"):
        load_calibration_prompts("", 8)


def test_memory_estimate_and_versions(fp_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = estimate_peak_memory(fp_dir)
    monkeypatch.setenv(MEMORY_FACTOR_ENV, "100")
    assert estimate_peak_memory(fp_dir) > base > 0
    assert 0 < available_memory() < 2**50
    versions = package_versions()
    assert set(versions) == {"openvino", "nncf", "torch", "diffusers", "transformers", "datasets", "darkroom"}
    assert versions["nncf"].split(".")[0].isdigit()
