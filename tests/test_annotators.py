"""ControlNet annotators: Canny, OpenPose's body network on OpenVINO (parity with torch), weights from a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.pipelines.annotators import Annotators, AnnotatorUnavailable, convert_body_network, settings_digest


def _photo(size: int = 64) -> np.ndarray:
    from workers.pipelines.controlnet import procedural_control

    noise = np.random.default_rng(0).integers(0, 96, (size, size, 3))
    return (procedural_control(size, size, seed=3) // 2 + noise).astype(np.uint8)


def test_canny_needs_no_weights_and_keeps_the_size(tmp_path: Path) -> None:
    annotate = Annotators(folder=tmp_path / "none", ir_cache=tmp_path / "ir")
    edges = annotate("canny", _photo())
    assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255} and annotate.runs == 1
    assert settings_digest("canny") != settings_digest("hed")


@pytest.mark.parametrize(("name", "needed"), [("openpose", "body_pose_model.pth"), ("depth", "dpt_hybrid-midas"),
                                              ("lineart", "sk_model.pth, sk_model2.pth"), ("segment", "sam_vit_h")])
def test_missing_weights_name_the_file_and_the_folder(tmp_path: Path, name: str, needed: str) -> None:
    annotate = Annotators(folder=tmp_path / "weights", ir_cache=tmp_path / "ir")
    with pytest.raises(AnnotatorUnavailable) as caught:
        annotate(name, _photo())
    assert needed in str(caught.value) and str(tmp_path / "weights") in str(caught.value)
    assert "DARKROOM_ANNOTATOR_WEIGHTS" in str(caught.value)


def test_openpose_body_network_on_openvino_matches_torch(tmp_path: Path) -> None:
    import openvino as ov
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    from workers.pipelines.annotators import OVBodyNetwork

    # The real architecture (52 M parameters) with random weights: small enough to build here.
    torch.manual_seed(0)
    model = bodypose_model().eval()
    xml = convert_body_network(model, tmp_path / "body.xml")
    core = ov.Core()
    network = OVBodyNetwork(core.read_model(xml), core, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for shape in ((1, 3, 184, 184), (1, 3, 96, 128)):  # two input sizes: each compiled on first use
        data = torch.rand(shape) - 0.5
        with torch.no_grad():
            expected = model(data)
        got = network(data)
        for e, g in zip(expected, got, strict=True):
            assert g.shape == e.shape
            assert torch.allclose(g, e, atol=1e-4, rtol=1e-3), float((g - e).abs().max())


def test_weight_file_annotators_run_from_the_folder(tmp_path: Path) -> None:
    import torch
    from controlnet_aux.hed import ControlNetHED_Apache2
    from controlnet_aux.open_pose.model import bodypose_model

    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), weights / "ControlNetHED.pth")
    # controlnet-aux's Body loads OpenPose's original key names (without the block prefix).
    state = bodypose_model().state_dict()
    torch.save({k.split(".", 1)[1]: v for k, v in state.items()}, weights / "body_pose_model.pth")
    annotate = Annotators(folder=weights, ir_cache=tmp_path / "ir")
    for name in ("hed", "openpose"):
        out = annotate(name, _photo())
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert list((tmp_path / "ir").glob("openpose-body-*.xml")), "the body network was converted to IR"
    assert annotate.runs == 2
