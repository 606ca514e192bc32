"""Session fixtures shared by the suite: tiny random-weight models built from configs."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "model", seed=0, variant="sd")


@pytest.fixture(scope="session")
def tiny_bksdm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from workers.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-bksdm") / "model", seed=0, variant="bk-sdm")
