#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite (CUDA hidden, Hugging Face offline).
# Usage: ./run_tests.sh [--use-current-env] [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
args=()
for a in "$@"; do
  case "$a" in
    --use-current-env) export CALIB_USE_CURRENT_ENV=1 ;;
    *) args+=("$a") ;;
  esac
done
# shellcheck source=scripts/bootstrap.sh
source "$ROOT/scripts/bootstrap.sh"
t0=$SECONDS
calib_bootstrap "$ROOT"
echo "[calib] environment ready in $((SECONDS - t0)) s ($PY)"
export HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES="" PYTHONHASHSEED=0
cd "$ROOT"
# lint first (configured in pyproject.toml): CI fails on what `ruff check` finds, before any test runs
"$PY" -m ruff check calib tests notebooks scripts
set +e
"$PY" -m pytest "${args[@]}"
rc=$?
set -e
echo "[calib] tests finished in $((SECONDS - t0)) s (exit $rc)"
exit $rc
