"""Notebook parameters: papermill's ``-p`` text parsed by ``notebook.setup``, empty or invalid lists stopped there."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

import calib
import calib.experiments.notebook
from calib.experiments.notebook import ParameterError, parse_parameters, setup

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SETUP_LINE = re.compile(r"^device = calib\.experiments\.notebook\.setup\(.*\)$", re.M)


def namespace(**values: Any) -> dict[str, Any]:
    """A notebook's globals after papermill: the parameters cell's annotations, then plain injected values."""
    kinds = {"seeds": list, "ablations": list, "epochs": int, "scale": float, "colab_drive": bool}
    defaults = {"seeds": [0, 1, 2], "ablations": [], "epochs": 100, "scale": 1.0, "colab_drive": False}
    return {"__annotations__": kinds, **defaults, **values}


def test_list_given_as_text_is_parsed_and_written_back():
    ns = namespace(seeds="[0, 1]")  # what `papermill -p seeds "[0, 1]"` injects
    assert setup(ns["colab_drive"], ns, allow_empty=["ablations"]) == "cpu"  # still returns the device
    assert ns["seeds"] == [0, 1]


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("seeds", "[0, 1]", [0, 1]),
        ("seeds", '["toy", "waterbirds"]', ["toy", "waterbirds"]),  # JSON
        ("seeds", "['toy', 'waterbirds']", ["toy", "waterbirds"]),  # Python
        ("seeds", '[["calib-toy-vit", "toy"]]', [["calib-toy-vit", "toy"]]),  # pairs, as notebook 03's backbones
        ("seeds", "(0, 1)", [0, 1]),
        ("ablations", "[]", []),  # allowed: ablations' [] runs all
    ],
)
def test_list_text_forms(name, text, expected):
    ns = namespace(**{name: text})
    parse_parameters(ns, allow_empty=["ablations"])
    assert ns[name] == expected


def test_scalars_given_as_text_are_parsed():
    ns = namespace(epochs="5", scale="0.5", colab_drive="False")  # what `papermill -r` injects
    changed = parse_parameters(ns, allow_empty=["ablations"])
    assert changed == {"epochs": 5, "scale": 0.5, "colab_drive": False}
    assert ns["epochs"] == 5 and ns["scale"] == 0.5 and ns["colab_drive"] is False
    ns = namespace(scale=1)  # `-p scale 1` arrives as the int 1
    parse_parameters(ns, allow_empty=["ablations"])
    assert ns["scale"] == 1.0 and isinstance(ns["scale"], float)


def test_defaults_are_left_alone():
    ns = namespace()
    seeds = ns["seeds"]
    assert parse_parameters(ns, allow_empty=["ablations"]) == {}
    assert ns["seeds"] is seeds


def test_empty_list_stops_with_a_message_naming_the_parameter():
    ns = namespace(seeds=[])  # what `papermill -y "seeds: []"` injects
    with pytest.raises(ParameterError, match=r"notebook parameter seeds = \[\]: expected a non-empty list"):
        setup(False, ns, allow_empty=["ablations"])
    with pytest.raises(ParameterError, match=r"seeds = '\[\]': expected a non-empty list"):
        parse_parameters(namespace(seeds="[]"), allow_empty=["ablations"])  # `-p seeds "[]"`


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("seeds", "[0, 1", r"seeds = '\[0, 1': expected a list written as JSON or Python"),
        ("seeds", "[CFR (default)]", r"seeds = '\[CFR \(default\)\]': expected a list .*quote every string"),
        ("seeds", 0, r"seeds = 0: expected a list, e.g. -p seeds \"\[0\]\""),  # `-p seeds 0`
        ("seeds", "toy", r"seeds = 'toy': expected a list"),
        ("epochs", "five", r"epochs = 'five': expected a number \(int\)"),
        ("epochs", 2.5, r"epochs = 2.5: expected a number \(int\)"),
        ("colab_drive", "maybe", r"colab_drive = 'maybe': expected True or False"),
    ],
)
def test_invalid_values_stop_with_a_message(name, value, message):
    with pytest.raises(ParameterError, match=message):
        parse_parameters(namespace(**{name: value}), allow_empty=["ablations"])


def test_allow_empty_must_name_list_parameters():
    with pytest.raises(ValueError, match="ablation"):
        parse_parameters(namespace(), allow_empty=["ablation"])  # a typo would silently change the rule


def test_string_annotations_and_generics():
    ns = {"__annotations__": {"seeds": "list[int]", "epochs": "int"}, "seeds": "[3]", "epochs": "7"}
    parse_parameters(ns)
    assert ns == {"__annotations__": ns["__annotations__"], "seeds": [3], "epochs": 7}
    ns = {"__annotations__": {"seeds": list[int]}, "seeds": "[3]"}
    parse_parameters(ns)
    assert ns["seeds"] == [3]


def test_without_a_namespace_nothing_is_checked():
    assert setup() == "cpu"


def test_colab_drive_as_text_false_stays_off(capfd):
    ns = namespace(colab_drive="False")  # truthy text: read as on before parsing
    setup(ns["colab_drive"], ns, allow_empty=["ablations"])
    assert "colab_drive=True outside Colab" not in capfd.readouterr().out


def _parameters_and_setup(nb: Path) -> tuple[str, str]:
    """The notebook's parameters cell and its setup line, as committed."""
    code = [c for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "code"]
    params = next(c.source for c in code if "parameters" in c.metadata.get("tags", []))
    cells = [c.source for c in code]
    lines = [m.group(0) for c in cells for m in SETUP_LINE.finditer(c)]
    assert len(lines) == 1, f"{nb.name}: one setup call, with the namespace"
    assert "globals()" in lines[0], f"{nb.name}: setup(colab_drive, globals()) parses papermill's text parameters"
    return params, lines[0]


def _run_setup(params: str, line: str, **injected: Any) -> dict[str, Any]:
    ns: dict[str, Any] = {"calib": calib}  # the setup line's `import calib.experiments.notebook`
    exec(params, ns)  # records the annotations in ns["__annotations__"], as the kernel does
    ns.update(injected)  # papermill's injected-parameters cell
    exec(line, ns)
    return ns


# the empty lists ./run_all.sh passes: the paper profile's notebook 08 runs open_clip tags only, 06 skips the testbed
RUN_ALL_EMPTIES = {"06_cfr_dynamics": {"testbed_core": []}, "08_pretraining_sources": {"sources": []}}


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_parses_its_list_parameters(nb):
    params, line = _parameters_and_setup(nb)
    defaults = _run_setup(params, line)
    lists = [k for k, t in defaults["__annotations__"].items() if t is list]
    # every list parameter given as its text (-p NAME "[...]") comes back as the list
    for name in lists:
        value = defaults[name] or [["x", "y"]]
        assert _run_setup(params, line, **{name: repr(value)})[name] == value, name
    # empty: an error unless the notebook gives [] a meaning (its default is [] or ./run_all.sh passes [])
    for name in lists:
        if defaults[name] == [] or name in RUN_ALL_EMPTIES.get(nb.stem, {}):
            assert _run_setup(params, line, **{name: []})[name] == []
        else:
            with pytest.raises(ParameterError, match=rf"notebook parameter {name} = \[\]"):
                _run_setup(params, line, **{name: []})
    if nb.stem in RUN_ALL_EMPTIES:
        _run_setup(params, line, **RUN_ALL_EMPTIES[nb.stem])


def _quickstart_to_setup(tmp_path: Path) -> Path:
    """Notebook 00 as committed, up to its setup cell, then a cell that prints the seeds it got."""
    book = nbformat.read(REPO / "notebooks" / "00_quickstart.ipynb", as_version=4)
    end = next(i for i, c in enumerate(book.cells) if SETUP_LINE.search(c.source))
    book.cells = [*book.cells[: end + 1], nbformat.v4.new_code_cell('print("seeds:", repr(seeds))')]
    path = tmp_path / "quickstart_setup.ipynb"
    nbformat.write(book, path)
    return path


def test_papermill_p_list_and_empty_list(tmp_path):
    """The reported commands, on notebook 00's own parameters cell and setup cell (its training cells cut off)."""
    import papermill

    nb = _quickstart_to_setup(tmp_path)
    out = tmp_path / "out.ipynb"
    cmd = [sys.executable, "-m", "papermill", "--log-level", "WARNING", "-k", "python3", str(nb), str(out)]
    done = subprocess.run([*cmd, "-p", "seeds", "[0, 1]"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = [o for c in nbformat.read(out, as_version=4).cells for o in c.get("outputs", [])]
    assert "seeds: [0, 1]\n" in [o.get("text", "") for o in outputs]

    with pytest.raises(papermill.PapermillExecutionError) as err:  # `-y "seeds: []"`
        papermill.execute_notebook(nb, out, parameters={"seeds": []}, kernel_name="python3", progress_bar=False)
    assert err.value.ename == "ParameterError"
    assert "notebook parameter seeds = []: expected a non-empty list" in err.value.evalue


def _papermill_commands(doc: Path) -> list[list[str]]:
    """Every ``python -m papermill`` command in a document's code blocks, continuation lines joined."""
    text = doc.read_text().replace("\\\n", " ")
    return [shlex.split(line.strip()) for line in text.splitlines() if " -m papermill " in line and "`" not in line]


DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "docs" / "usage.md", REPO / "docs" / "paper_profile.md"]


def test_documented_papermill_parameters_pass_setup():
    """The documented commands' parameters, converted as papermill's CLI does, pass every notebook's setup."""
    import yaml
    from papermill.cli import _resolve_type

    commands = [cmd for doc in DOCS for cmd in _papermill_commands(doc)]
    assert any("seeds" in cmd for cmd in commands)  # docs/usage.md shows a list parameter with -p
    for cmd in commands:
        nb, injected = REPO / cmd[cmd.index("papermill") + 1], {}
        args = iter(cmd[cmd.index("papermill") + 3 :])
        for flag in args:
            if flag == "-p":
                injected[next(args)] = _resolve_type(next(args))
            elif flag == "-y":
                injected.update(yaml.safe_load(next(args)))
        ns = _run_setup(*_parameters_and_setup(nb), **injected)
        assert all(isinstance(ns[k], list) for k, t in ns["__annotations__"].items() if t is list), cmd
