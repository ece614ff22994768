#!/usr/bin/env bash
# Regenerate every result and figure.  Sets up the environment if needed, then runs every notebook in
# order with papermill on the built-in toy benchmark (no downloads).  Executed notebooks go to
# notebooks/executed/ (git-ignored), figures and tables to figures/, result rows to results/.
#
# Usage: ./run_all.sh [--use-current-env] [--quick] [--only NN]
#   --use-current-env  use the current Python environment (conda, Colab) instead of ./.venv
#   --quick            smoke run: 4% toy benchmark, seconds-long toy CLIP, 1 seed, few epochs
#   --only NN          run only notebooks whose name starts with NN (e.g. 01)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
quick=0
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --use-current-env) export CALIB_USE_CURRENT_ENV=1 ;;
    --quick) quick=1 ;;
    --only) only="$2"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# shellcheck source=scripts/bootstrap.sh
source "$ROOT/scripts/bootstrap.sh"
declare -a stage_names=() stage_secs=()
stage() { stage_names+=("$1"); stage_secs+=("$2"); echo "[calib] $1: $2 s"; }

t=$SECONDS; calib_bootstrap "$ROOT"; stage "environment set-up" $((SECONDS - t))
export CALIB_HOME="${CALIB_HOME:-$ROOT}"
export PYTHONHASHSEED=0
cd "$ROOT"

if [ "$quick" = 1 ]; then
  dataset=toy-quick; pretrained=toy-quick
  nb_params=(-y "{dataset: toy-quick, pretrained: toy-quick, seeds: [0], epochs: 3}")
else
  dataset=toy; pretrained=toy
  nb_params=()
fi
data_dir="$("$PY" -c 'from calib.experiment import default_root; import sys; print(default_root(sys.argv[1]))' "$dataset")"

t=$SECONDS
if [ "$quick" = 1 ]; then "$PY" -m calib data make-toy --root "$data_dir" --scale 0.04
else "$PY" -m calib data make-toy --root "$data_dir"; fi
stage "toy data" $((SECONDS - t))
t=$SECONDS; "$PY" -m calib toy-clip --preset "$pretrained"; stage "toy CLIP training" $((SECONDS - t))
t=$SECONDS; "$PY" -m calib extract --dataset "$dataset" --model calib-toy-vit --pretrained "$pretrained"
stage "feature extraction" $((SECONDS - t))

mkdir -p notebooks/executed
t_nb=$SECONDS
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  name="$(basename "$nb")"
  [ -n "$only" ] && [[ "$name" != "$only"* ]] && continue
  t=$SECONDS
  "$PY" -m papermill --log-level WARNING -k python3 "$nb" "notebooks/executed/$name" "${nb_params[@]}"
  stage "notebook $name" $((SECONDS - t))
done
stage "notebooks (total, methods included)" $((SECONDS - t_nb))

if [ "$quick" = 0 ] && [ -z "$only" ]; then "$PY" -m calib report readme --experiment spurious_correlation --dataset toy; fi

echo
echo "[calib] wall time by stage (s):"
for i in "${!stage_names[@]}"; do printf '  %-45s %6s\n' "${stage_names[$i]}" "${stage_secs[$i]}"; done
printf '  %-45s %6s\n' "total" "$SECONDS"
echo "[calib] figures in $ROOT/figures, executed notebooks in $ROOT/notebooks/executed, rows in ${CALIB_HOME}/results"
