"""run_all's up-to-date stamps: a notebook is skipped only when its inputs are unchanged and its outputs exist."""

from __future__ import annotations

import subprocess
import sys

from calib.experiments import stamps


def test_a_stamp_matches_until_an_input_or_an_output_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("CALIB_HOME", str(tmp_path / "home"))
    for var in ("CALIB_FIGURES_DIR", "CALIB_RESULTS_DIR"):
        monkeypatch.delenv(var, raising=False)
    from calib.core import paths

    nb, executed, sdir = tmp_path / "01_x.ipynb", tmp_path / "out.ipynb", tmp_path / "stamps"
    nb.write_text("{}")
    paths.figures_dir().mkdir(parents=True)
    fig = paths.figures_dir() / "x.png"
    fig.write_bytes(b"png")
    assert not stamps.is_current(sdir, nb, executed, "{seeds: [0]}")  # never run
    stamps.write_stamp(sdir, nb, "{seeds: [0]}")
    assert not stamps.is_current(sdir, nb, executed, "{seeds: [0]}")  # no executed copy
    executed.write_text("{}")
    assert stamps.is_current(sdir, nb, executed, "{seeds: [0]}")
    assert not stamps.is_current(sdir, nb, executed, "{seeds: [1]}")  # other parameters
    nb.write_text('{"cells": []}')
    assert not stamps.is_current(sdir, nb, executed, "{seeds: [0]}")  # the notebook changed
    stamps.write_stamp(sdir, nb, "{seeds: [0]}")
    assert stamps.is_current(sdir, nb, executed, "{seeds: [0]}")
    fig.unlink()
    assert not stamps.is_current(sdir, nb, executed, "{seeds: [0]}")  # an output is gone
    stamps.write_stamp(sdir, nb, "{seeds: [0]}")
    monkeypatch.setattr(stamps, "code_hash", lambda length=12: "other code")
    assert not stamps.is_current(sdir, nb, executed, "{seeds: [0]}")  # calib's source changed


def test_the_command_line_answers_by_exit_status(tmp_path):
    nb = tmp_path / "nb.ipynb"
    nb.write_text("{}")
    run = [sys.executable, "-m", "calib.experiments.stamps"]
    env_args = {"capture_output": True, "text": True}
    assert subprocess.run([*run, "check", str(tmp_path), str(nb), str(nb), "p"], **env_args).returncode == 1
    assert subprocess.run([*run, "write", str(tmp_path), str(nb), str(nb), "p"], **env_args).returncode == 0
    assert subprocess.run([*run, "check", str(tmp_path), str(nb), str(nb), "p"], **env_args).returncode == 0
    assert subprocess.run([*run, "bogus"], **env_args).returncode == 2
