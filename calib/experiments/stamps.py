"""Up-to-date stamps for ``./run_all.sh``: a notebook whose inputs have not changed since its last successful
run is not executed again (a warm run takes seconds), like the result rows
:func:`calib.experiments.runner.run_experiment` reuses.

A stamp holds the hash of everything a notebook's outputs depend on -- calib's source
(:func:`calib.core.hashing.code_hash`; the toy data and toy CLIP are functions of it), the notebook file and its
papermill parameters -- and the figure and result files present after the run.  It matches when the hash is equal,
the executed copy exists and those files still exist.  ``./run_all.sh --force`` ignores stamps.  Command line
(no torch import, well under a second)::

    python -m calib.experiments.stamps check|write STAMP_DIR NOTEBOOK EXECUTED PARAMS
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from calib.core import paths
from calib.core.hashing import code_hash


def notebook_key(notebook: Path, params: str) -> str:
    """Hash of calib's source, the notebook's bytes and its parameters (a string, e.g. papermill's YAML)."""
    h = hashlib.sha256()
    for part in (code_hash(64).encode(), Path(notebook).read_bytes(), params.encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:20]


def _stamp_path(stamp_dir: Path, notebook: Path) -> Path:
    return Path(stamp_dir) / f"{Path(notebook).stem}.json"


def _outputs() -> list[str]:
    """The figure and result files under CALIB_HOME now (relative names)."""
    out = []
    for folder in (paths.figures_dir(), paths.results_dir()):
        if folder.is_dir():
            out += sorted(f"{folder.name}/{p.name}" for p in folder.glob("*") if p.is_file())
    return out


def _exists(name: str) -> bool:
    folder, file = name.split("/", 1)
    base = paths.figures_dir() if folder == paths.figures_dir().name else paths.results_dir()
    return (base / file).is_file()


def is_current(stamp_dir: Path, notebook: Path, executed: Path, params: str) -> bool:
    """Whether ``notebook``'s last successful run had these inputs and its outputs are all still there."""
    path = _stamp_path(stamp_dir, notebook)
    if not path.is_file() or not Path(executed).is_file():
        return False
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("key") != notebook_key(notebook, params):
        return False
    return all(_exists(name) for name in stamp.get("outputs", []))


def write_stamp(stamp_dir: Path, notebook: Path, params: str) -> Path:
    """Record a successful run of ``notebook`` (its input hash and the figure and result files present now)."""
    path = _stamp_path(stamp_dir, notebook)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": notebook_key(notebook, params), "outputs": _outputs()}))
    return path


def main(argv: list[str]) -> int:
    if len(argv) != 5 or argv[0] not in ("check", "write"):
        print("usage: " + __doc__.split("::")[-1].strip(), file=sys.stderr)
        return 2
    action, stamp_dir, notebook, executed, params = argv
    if action == "check":
        return 0 if is_current(Path(stamp_dir), Path(notebook), Path(executed), params) else 1
    write_stamp(Path(stamp_dir), Path(notebook), params)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
