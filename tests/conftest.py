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
    from calib.data import prepare_dataset

    return prepare_dataset("toy-quick")


@pytest.fixture(scope="session")
def toy_features(toy_quick):
    """Cached features of the quick toy benchmark under the quick toy CLIP."""
    from calib.clip.features import prepare_features

    return prepare_features("toy-quick", "calib-toy-vit", "toy-quick", device="cpu", num_workers=0)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


class BackgroundRun:
    """A ``./run_all.sh`` started in the background; :meth:`wait` returns ``(returncode, stdout, stderr)``."""

    def __init__(self, args: list[str], home: Path, timeout: float = 900):
        import subprocess
        import sys

        env = {**os.environ, "CALIB_USE_CURRENT_ENV": "1", "PYTHON": sys.executable, "CALIB_HOME": str(home)}
        for var in ("CALIB_DATA_DIR", "CALIB_CACHE_DIR", "CALIB_RESULTS_DIR", "CALIB_FIGURES_DIR"):
            env.pop(var, None)
        self.home, self.timeout = home, timeout
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "run_all.sh"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._result: tuple[int, str, str] | None = None

    def wait(self) -> tuple[int, str, str]:
        if self._result is None:
            out, err = self.proc.communicate(timeout=self.timeout)
            self._result = (self.proc.returncode, out, err)
        return self._result


@pytest.fixture(scope="session")
def start_run_all() -> type[BackgroundRun]:
    """``start_run_all(args, home)`` starts ``./run_all.sh args`` in the background (pytest advises against
    importing ``conftest`` from a test module, so the class is handed out as a fixture)."""
    return BackgroundRun


@pytest.fixture(scope="session")
def paper_profile_run(tmp_path_factory) -> BackgroundRun:
    """``./run_all.sh --profile paper --quick`` on MetaShift and CheXpert fixtures (release layouts) with the toy
    architecture at random weights, started in the background.  ``tests/test_notebooks.py``'s quick run requests it
    first, so the suite's two long end-to-end runs overlap on the CPU's cores; ``tests/test_profile.py`` waits for
    it.  Waterbirds and CelebA are left out to keep it short (they share the Waterbirds-style official-split path the
    toy profile runs).  It runs the cells as two torchrun processes (``--nproc 2``), so the multi-GPU path is the one
    tested end to end."""
    import shutil

    from tests.fixtures import write_paper_data_dir

    root = tmp_path_factory.mktemp("paper_profile")
    data = write_paper_data_dir(root / "data", per_group=6)
    shutil.rmtree(data / "waterbirds")
    shutil.rmtree(data / "celeba")
    args = ["--profile", "paper", "--data-dir", str(data), "--backbones", "calib-toy-vit:random", "--quick"]
    args += ["--nproc", "2"]  # the two cells on two torchrun processes (gloo): each rank one cell, rank 0 the tables
    run = BackgroundRun(args + ["--tpt-images", "20"], root / "home")
    yield run
    if run.proc.poll() is None:  # a run nobody waited for (a subset of the tests was selected)
        run.proc.kill()
        run.proc.communicate()
