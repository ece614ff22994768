#!/usr/bin/env bash
# Download, here, the Python 3.12 wheels the GPU machine lacks (open_clip, ftfy, papermill and a Jupyter kernel),
# at the versions of this checkout's .venv, into .whl/ (git-ignored locally).  The device tool carries .whl
# (`carry: [".whl"]`) and scripts/gpu_rehearsal.sh installs them there.  Needs the package index (this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
# what calib needs there beyond the image's packages (KINDS.md lists those), with their own missing needs
NEEDED="open_clip_torch ftfy wcwidth papermill nbformat nbclient ipykernel jupyter_client jupyter_core traitlets pyzmq
tornado comm debugpy ipython matplotlib-inline nest-asyncio2 jedi parso prompt_toolkit pexpect ptyprocess stack_data
asttokens executing pure_eval ipython_pygments_lexers fastjsonschema jsonschema jsonschema-specifications referencing
rpds-py platformdirs tenacity entrypoints"
pins=$("$PY" -c 'import importlib.metadata as md, sys; print(" ".join(f"{n}=={md.version(n)}" for n in sys.argv[1:]))' $NEEDED)
mkdir -p .whl
for pin in $pins; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pin"
done
du -sh .whl
