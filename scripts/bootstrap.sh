# Sourced by run_all.sh and run_tests.sh.  `calib_bootstrap ROOT` sets PY to a Python that has calib
# and everything it needs:
#   default                  a project virtual environment at $CALIB_VENV (default ROOT/.venv), created
#                            on first use and re-installed whenever pyproject.toml changes;
#   CALIB_USE_CURRENT_ENV=1  the current interpreter ($PYTHON or python3: conda, Colab, your own venv);
#                            calib is pip-installed into it only if it cannot be imported.
# Base interpreter for the venv: $CALIB_PYTHON (default python3), Python >= 3.10.

_calib_pip() {  # quiet pip, minus this machine's harmless index-location warnings
  "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

calib_bootstrap() {
  local root="$1"
  if [ "${CALIB_USE_CURRENT_ENV:-0}" = "1" ]; then
    PY="${PYTHON:-python3}"
    if ! "$PY" -c "import calib, open_clip, papermill, pytest, ruff" >/dev/null 2>&1; then
      echo "[calib] installing calib into the current environment ($PY)"
      _calib_pip "$PY" -m pip install -q -e "$root[dev]"
    fi
    return 0
  fi
  local base="${CALIB_PYTHON:-python3}"
  if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "[calib] error: calib needs Python >= 3.10; '$base' is $("$base" --version 2>&1). Set CALIB_PYTHON." >&2
    return 1
  fi
  local venv="${CALIB_VENV:-$root/.venv}"
  local stamp="$venv/.calib-install-stamp"
  local want
  want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16) $root"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[calib] creating the project environment at $venv"
    "$base" -m venv "$venv"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "[calib] installing calib and its dependencies into $venv (one time; a few minutes)"
    _calib_pip "$venv/bin/python" -m pip install -q --upgrade pip
    _calib_pip "$venv/bin/python" -m pip install -q -e "$root[dev]"
    echo "$want" > "$stamp"
  fi
  PY="$venv/bin/python"
}
