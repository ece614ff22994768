"""Test set-up: CUDA hidden, Hugging Face offline, every calib path in a temporary folder."""

from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported anywhere
os.environ["HF_HUB_OFFLINE"] = "1"

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def calib_home(tmp_path_factory) -> Path:
    """All data, caches, results and figures of the test session live in one temporary folder."""
    home = tmp_path_factory.mktemp("calib_home")
    for var in ("CALIB_HOME", "CALIB_DATA_DIR", "CALIB_CACHE_DIR", "CALIB_RESULTS_DIR", "CALIB_FIGURES_DIR"):
        os.environ.pop(var, None)
    os.environ["CALIB_HOME"] = str(home)
    os.environ["HF_HUB_CACHE"] = str(home / "hf_cache")  # empty: no pretrained weights anywhere
    logging.getLogger("calib").setLevel(logging.INFO)
    return home


@pytest.fixture(scope="session")
def toy_quick():
    """The 4% toy benchmark, loaded (made once per session)."""
    from calib.experiment import prepare_dataset

    return prepare_dataset("toy-quick")


@pytest.fixture(scope="session")
def toy_features(toy_quick):
    """Cached features of the quick toy benchmark under the quick toy CLIP."""
    from calib.experiment import prepare_features

    return prepare_features("toy-quick", "calib-toy-vit", "toy-quick", device="cpu", num_workers=0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
