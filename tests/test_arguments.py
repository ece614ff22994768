"""Every command-line argument is checked with its name, option values against their declared ranges, Ctrl-C
stops with one line, and start-up imports neither torch nor scikit-learn (issue: bad input)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from calib.core import paths
from calib.experiments import cli
from calib.experiments.cli import main
from calib.methods import REGISTRY, describe_methods, make_options

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn")  # what start-up must not import


@pytest.fixture(autouse=True)
def _drop_cli_log_handler():
    """main() routes calib's logs to the sys.stderr of its call (capsys's, in a test): drop that handler after each
    test, or later tests log to a closed stream."""
    yield
    import logging

    logger = logging.getLogger("calib")
    for handler in [h for h in logger.handlers if getattr(h, "_calib", False)]:
        logger.removeHandler(handler)
    logger.propagate = True


def _npz(path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        y = rng.integers(0, 2, 40)
        arrays |= {
            f"embeddings_{split}": rng.normal(size=(40, 8)).astype(np.float32),
            f"y_{split}": y,
            f"g_{split}": 2 * y + rng.integers(0, 2, 40),
        }
    np.savez(path, **arrays)
    return path


def _parse_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """stderr of a command that argument parsing rejects (exit status 2, before any work)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


# -- seeds, counts, the toy's scale: checked at parsing, named ------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--embeddings", "E", "--method", "linear_probe", "--seed", "-1"], "--seed must be"),
        (["realism", "--dataset", "testbed", "--seed", "-1"], "--seed must be"),
        (["data", "make-toy", "--root", "R", "--seed", "-1"], "--seed must be"),
        (["bench", "methods", "--method", "zeroshot", "--no-flops", "--seeds", "0", "-1"], "--seeds must be"),
    ],
)
def test_a_negative_seed_is_named(tmp_path, capsys, argv, message):
    argv = [str(_npz(tmp_path / "e.npz")) if a == "E" else str(tmp_path / "toy") if a == "R" else a for a in argv]
    err = _parse_error(capsys, argv)
    # numpy's own message, "expected non-negative integer", named no argument
    assert f"{message} a non-negative integer, got -1" in err
    assert not (tmp_path / "toy").exists()


def test_batch_size_zero_stops_at_parsing(capsys):
    argv = ["extract", "--dataset", "toy-quick", "--model", "calib-toy-vit", "--pretrained", "random"]
    assert "--batch-size must be >= 1, got 0" in _parse_error(capsys, [*argv, "--batch-size", "0"])
    err = _parse_error(capsys, ["bench", "throughput", "--batch-size", "-4"])
    assert "--batch-size must be >= 1, got -4" in err
    assert "--seconds must be a finite number > 0, got 0.0" in _parse_error(
        capsys, ["bench", "throughput", "--seconds", "0"]
    )
    assert "--epochs must be >= 1, got 0" in _parse_error(capsys, ["bench", "methods", "--epochs", "0"])
    assert "--seeds must be >= 1, got 0" in _parse_error(capsys, ["plan", "--seeds", "0"])


@pytest.mark.parametrize("scale", ["0", "-1", "1.5", "nan"])
def test_toy_scale_outside_zero_one_is_refused(tmp_path, capsys, scale):
    root = tmp_path / "toy"
    err = _parse_error(capsys, ["data", "make-toy", "--root", str(root), "--scale", scale])
    assert "--scale must be in (0, 1]" in err
    assert not root.exists()  # used to write a 24-image benchmark quietly


def test_cuda_without_a_gpu_says_so(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["extract", "--dataset", "toy-quick", "--model", "calib-toy-vit", "--pretrained", "random"]
    err = _parse_error(capsys, [*argv, "--device", "cuda"])
    assert "--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); use --device cpu" in err
    assert "weights" not in err  # the old message blamed the weights file
    err = _parse_error(capsys, ["bench", "throughput", "--device", "gpu"])
    assert "--device 'gpu' is not a device torch knows" in err


# -- folders ----------------------------------------------------------------------------------------------------------


def test_root_that_is_a_file(tmp_path, capsys):
    from calib.data import DatasetLayoutError, load_dataset, prepare_dataset

    afile = tmp_path / "somefile"
    afile.write_text("not a folder")
    err = _parse_error(capsys, ["data", "check", "--dataset", "waterbirds", "--root", str(afile)])
    assert f"--root {afile} is a file; it must be a folder" in err
    err = _parse_error(
        capsys, ["extract", "--dataset", "toy-quick", "--root", str(afile), "--model", "m", "--pretrained", "p"]
    )
    assert f"--root {afile} is a file; it must be a folder" in err
    err = _parse_error(capsys, ["data", "make-toy", "--root", str(afile / "toy")])
    assert f"--root {afile / 'toy'} lies inside {afile}, which is a file; it must be a folder" in err
    # the Python entry points too
    with pytest.raises(DatasetLayoutError, match="is a file; it must be a folder"):
        load_dataset("waterbirds", afile)
    with pytest.raises(DatasetLayoutError, match="is a file; it must be a folder"):
        prepare_dataset("toy-quick", afile)


def test_calib_home_that_is_a_file(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "home_file"
    afile.write_text("")
    monkeypatch.setenv("CALIB_HOME", str(afile))
    with pytest.raises(paths.NotAFolderError, match=r"CALIB_HOME=.*home_file is a file; it must be a folder"):
        paths.cache_dir()
    argv = ["extract", "--dataset", "toy-quick", "--model", "calib-toy-vit", "--pretrained", "random"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: CALIB_HOME={afile} is a file; it must be a folder" in err and "Traceback" not in err
    monkeypatch.setenv("CALIB_HOME", str(afile / "sub"))
    with pytest.raises(paths.NotAFolderError, match="lies inside .*home_file, which is a file"):
        paths.results_dir()
    # a location set on its own does not depend on CALIB_HOME
    monkeypatch.setenv("CALIB_CACHE_DIR", str(tmp_path / "cache"))
    assert paths.cache_dir() == (tmp_path / "cache").resolve()


# -- unknown datasets ----------------------------------------------------------------------------------------------


def test_unknown_dataset_lists_the_toys(tmp_path, capsys):
    from calib.data import load_dataset, prepare_dataset

    for call in (lambda: load_dataset("foo", tmp_path), lambda: prepare_dataset("foo", tmp_path)):
        with pytest.raises(ValueError, match="unknown dataset 'foo'; known: .*toy, toy-quick, waterbirds"):
            call()
    assert main(["data", "check", "--dataset", "foo", "--root", str(tmp_path)]) == 2
    assert "toy, toy-quick" in capsys.readouterr().err
    assert main(["bench", "methods", "--dataset", "foo", "--no-flops"]) == 2
    assert "known: synthetic, celeba, " in capsys.readouterr().err


def test_data_check_reads_a_toy_benchmark(toy_quick, capsys):
    assert main(["data", "check", "--dataset", "toy-quick", "--root", str(toy_quick.root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["dataset"] == "toy-quick"


# -- method options: declared ranges, the syntax `list methods` prints --------------------------------------------


def test_option_outside_its_range_names_it(tmp_path, capsys):
    path = _npz(tmp_path / "e.npz")
    assert main(["evaluate", "--embeddings", str(path), "--method", "dfr", "--option", "n_retrains=-3"]) == 2
    err = capsys.readouterr().err
    assert "option 'n_retrains' of method 'dfr' must be >= 1, got -3" in err and "Traceback" not in err
    with pytest.raises(ValueError, match=r"option 'dropout' of method 'cfr' must be in \[0, 1\), got 1.0"):
        make_options("cfr", {"dropout": "1"})
    with pytest.raises(ValueError, match=r"option 'lr' of method 'clip_erm' must be > 0, got 0.0"):
        make_options("clip_erm", {"lr": 0})
    with pytest.raises(ValueError, match=r"'C_grid' of method 'dfr' must be > 0 \(each item\), got \(1.0, -0.1\)"):
        make_options("dfr", {"C_grid": "1,-0.1"})
    with pytest.raises(ValueError, match=r"'selection_p' of method 'tpt' must be in \(0, 1\], got nan"):
        make_options("tpt", {"selection_p": "nan"})
    # the bounds themselves are valid where the range includes them
    assert make_options("cfr", {"dropout": 0, "anchor_ce_weight": 0}).dropout == 0.0
    assert make_options("tpt", {"steps": 0, "selection_p": 1}).steps == 0


def test_every_method_declares_the_obvious_ranges():
    from calib.methods.base import in_range, option_ranges

    must = {  # option-name -> the range every method with such an option declares
        "epochs": {"ge": 1},
        "reference_epochs": {"ge": 1},
        "batch_size": {"ge": 1},
        "max_iter": {"ge": 1},
        "n_retrains": {"ge": 1},
        "n_clusters": {"ge": 1},
        "positives": {"ge": 1},
        "negatives": {"ge": 1},
        "views": {"ge": 1},
        "lr": {"gt": 0},
        "temperature": {"gt": 0},
        "tsc_temperature": {"gt": 0},
        "C": {"gt": 0},
        "weight_decay": {"ge": 0},
        "dropout": {"ge": 0, "lt": 1},
        "momentum": {"ge": 0, "lt": 1},
    }
    for name, cls in REGISTRY.items():
        ranges = option_ranges(cls.Options)
        defaults = cls.Options()
        for f in dataclasses.fields(cls.Options):
            if f.name in must:
                assert ranges.get(f.name) == must[f.name], (name, f.name)
            if f.name in ranges:  # the defaults (the paper's settings) lie in their ranges
                assert in_range(getattr(defaults, f.name), ranges[f.name]), (name, f.name)
        # a range lives in the field's metadata: the options' values, and so result keys, are unchanged
        assert dataclasses.asdict(make_options(name)) == dataclasses.asdict(defaults)


def test_list_methods_prints_the_syntax_evaluate_takes(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "--scaler" not in out
    current, seen = None, {}
    for line in out.splitlines():
        if line and not line.startswith(" ") and "[group labels:" in line:
            current = line.split()[0].rstrip("†‡§")
        elif line.strip().startswith("--option "):
            words = shlex.split(line.strip())
            assert words[0] == "--option" and "=" in words[1], line
            key, value = words[1].split("=", 1)
            seen.setdefault(current, {})[key] = value
    assert set(seen) == set(REGISTRY) - {"zeroshot"}  # zero-shot has no options
    assert "scaler=train" in out and "n_retrains=20  (int, >= 1)" in out
    assert "roboshot§  [group labels: none; uses: z, prompts; § names the spurious attribute in words]" in out
    for name, printed in seen.items():
        # what is printed, given back as --option KEY=VALUE, is each option's default
        assert dataclasses.asdict(make_options(name, printed)) == dataclasses.asdict(make_options(name)), name


def test_method_registry_cache_follows_the_code(tmp_path, monkeypatch):
    from calib.core import hashing

    monkeypatch.setenv("CALIB_CACHE_DIR", str(tmp_path / "cache"))
    fresh = json.loads(json.dumps(describe_methods(), default=str))
    registry = cli.method_registry()
    assert registry["methods"] == fresh
    (cached,) = (tmp_path / "cache" / "methods").glob("registry-*.json")
    assert hashing.code_hash() in cached.name
    # the cached description is what the next call reads (it imports no method) ...
    cached.write_text(json.dumps({**registry, "methods": registry["methods"][:1]}))
    assert len(cli.method_registry()["methods"]) == 1
    # ... until calib's code changes: another code hash, described afresh
    monkeypatch.setattr(hashing, "_CODE_HASH", "0" * 64)
    assert cli.method_registry()["methods"] == fresh
    assert (tmp_path / "cache" / "methods" / "registry-000000000000.json").is_file()


# -- Ctrl-C ---------------------------------------------------------------------------------------------------------


def test_interrupt_in_process_is_one_line(monkeypatch, capsys):
    def stop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_extract", stop)
    try:
        status = main(["extract", "--dataset", "toy-quick", "--model", "m", "--pretrained", "p"])
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail("KeyboardInterrupt escaped main()")
    assert status == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted: calib extract stopped;")
    assert "running it again resumes" in err


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    # -X importtime writes each import to stderr as it happens: seeing torch imported tells that the command runs
    # (inside main), so the interrupt does not land in the interpreter's start-up
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "calib", "bench", "methods", "--dataset", "synthetic"]
        + ["--method", "cfr", "--no-flops"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(CALIB_HOME=str(tmp_path)),
        cwd=tmp_path,
    )
    head = []
    t0 = time.perf_counter()
    for line in proc.stderr:
        head.append(line)
        if line.rstrip().endswith("| calib.experiments.bench"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, tail = proc.communicate(timeout=120)
    print(f"interrupted after {time.perf_counter() - t0:.1f} s")
    lines = [ln for ln in "".join(head).splitlines() + tail.splitlines() if not ln.startswith("import time:")]
    # main() returns 130.  Once in ~30 runs under heavy load the process, having printed the same one line, ended by
    # SIGINT itself at exit (CPython does so when it saw a KeyboardInterrupt leave __main__; cause not pinned down):
    # Popen reports -2 there, a shell 130 for both
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, lines, out)
    assert "Traceback" not in tail and "KeyboardInterrupt" not in tail
    assert len(lines) == 1, lines
    assert lines[0].startswith("interrupted: calib bench methods stopped;") and len(lines[0]) < 200


# -- start-up -------------------------------------------------------------------------------------------------------


def _imports(argv: list[str], home: Path) -> tuple[set[str], float, subprocess.CompletedProcess]:
    """Top-level packages a ``python -m calib`` command imports, and its wall-clock seconds."""
    t0 = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "calib", *argv],
        capture_output=True,
        text=True,
        env=_env(CALIB_HOME=str(home)),
        timeout=300,
    )
    seconds = time.perf_counter() - t0
    names = {ln.split("|")[-1].strip().split(".")[0] for ln in run.stderr.splitlines() if ln.startswith("import time:")}
    return names, seconds, run


def test_start_up_imports_neither_torch_nor_sklearn(tmp_path, toy_quick):
    home = tmp_path / "home"
    warm = subprocess.run(  # describes the methods once (imports them) and caches it for this code
        [sys.executable, "-m", "calib", "list", "methods"],
        capture_output=True,
        text=True,
        env=_env(CALIB_HOME=str(home)),
    )
    assert warm.returncode == 0, warm.stderr
    for argv in (
        ["--help"],
        ["list", "methods"],
        ["list", "methods", "--json"],
        ["data", "check", "--dataset", "toy-quick", "--root", str(toy_quick.root)],
        ["data", "check", "--dataset", "waterbirds", "--root", str(tmp_path)],  # an error: the same imports
    ):
        names, seconds, run = _imports(argv, home)
        print(f"python -m calib {' '.join(argv[:3])}: {seconds:.2f} s")
        assert run.returncode in (0, 2), run.stderr[-2000:]
        assert "calib" in names and not set(HEAVY) & names, (argv, set(HEAVY) & names)
    assert (
        warm.stdout
        == subprocess.run(
            [sys.executable, "-m", "calib", "list", "methods"],
            capture_output=True,
            text=True,
            env=_env(CALIB_HOME=str(home)),
        ).stdout
    )  # read from the cache: the same listing
