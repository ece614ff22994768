#!/usr/bin/env bash
# Regenerate requirements.lock (exact versions of every dependency, dev extra included) from pyproject.toml.
# Run in the project environment on the reference platform (Linux x86_64, the CI machine's Python); versions
# already in the lock are kept when they still satisfy pyproject.toml (pass --upgrade to move them).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
"$PY" -m pip install -q "pip-tools>=7"
cd "$ROOT"
"$PY" -m piptools compile -q --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
  -o requirements.lock "$@" pyproject.toml
echo "requirements.lock: $(grep -c '^[a-zA-Z]' requirements.lock) pinned packages"
