#!/usr/bin/env bash
# Regenerate every result and figure.  Sets up the environment if needed, then runs every notebook in
# order with papermill on the built-in toy benchmark (no downloads).  Everything it writes goes under
# $CALIB_HOME (default: this checkout): executed notebooks to notebooks/executed/ (git-ignored), figures
# and tables to figures/, result rows to results/, data and caches to data/ and .cache/.
#
# Usage: ./run_all.sh [--use-current-env] [--quick] [--only NN] [--force]
#        ./run_all.sh --profile paper --data-dir DIR [--backbones M:P,...] [--quick] [--nproc N] [--dry-run]
#   --use-current-env  use the current Python environment (conda, Colab) instead of ./.venv
#   --quick            smoke run: 3 epochs; toy profile: 2 seeds (trained as lanes), three ablations, the 4% toy
#                      benchmark and a seconds-long toy CLIP; paper profile: 1 seed, one ablation
#   --only NN          run only notebooks whose name starts with NN (e.g. 01)
#   --force            (toy profile) execute every notebook, even those whose inputs (calib's code, the notebook,
#                      its parameters) are unchanged since their last run and whose outputs are all present
#   --profile paper    real datasets under DIR/{waterbirds,celeba,metashift,chexpert} x CLIP RN50 and ViT-L/14@336px
#                      (OpenAI weights) x every method x 5 seeds; missing datasets are skipped with one line
#   --backbones LIST   (paper profile) comma-separated open_clip MODEL:PRETRAINED pairs instead of the paper's
#                      two, e.g. ViT-B-32:laion2b_s34b_b79k or RN50:random (random weights: a smoke test)
#   --tpt-images N     (paper profile) TPT's seeded test subsample per dataset and backbone (default 500; 0: all)
#   --nproc N          (paper profile) spread the (dataset, backbone) cells over N processes with torchrun, one per
#                      GPU of the node (default 1); rank 0 writes the tables after every cell
#   --dry-run          (paper profile) list what would run and its estimated GPU hours, run nothing
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
quick=0
force=0
only=""
profile=toy
data_dir_arg=""
backbones_arg=""
dry=0
nproc=1
tpt_images=500
while [ $# -gt 0 ]; do
  case "$1" in
    --use-current-env) export CALIB_USE_CURRENT_ENV=1 ;;
    --quick) quick=1 ;;
    --force) force=1 ;;
    --only) only="$2"; shift ;;
    --profile) profile="$2"; shift ;;
    --data-dir) data_dir_arg="$2"; shift ;;
    --backbones) backbones_arg="$2"; shift ;;
    --dry-run) dry=1 ;;
    --tpt-images) tpt_images="$2"; shift ;;
    --nproc) nproc="$2"; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || { echo "--nproc takes a positive integer, got '$nproc'" >&2; exit 2; }
case "$profile" in
  paper) [ -n "$data_dir_arg" ] || { echo "--profile paper needs --data-dir DIR" >&2; exit 2; } ;;
  toy) [ "$dry" = 0 ] || { echo "--dry-run applies to --profile paper" >&2; exit 2; }
       [ -z "$backbones_arg" ] || { echo "--backbones applies to --profile paper (the toy profile uses the toy CLIP)" >&2; exit 2; }
       [ "$nproc" = 1 ] || { echo "--nproc applies to --profile paper (the toy profile is one process)" >&2; exit 2; } ;;
  *) echo "unknown profile $profile (toy or paper)" >&2; exit 2 ;;
esac

# shellcheck source=scripts/bootstrap.sh
source "$ROOT/scripts/bootstrap.sh"
declare -a stage_names=() stage_secs=()
stage() { stage_names+=("$1"); stage_secs+=("$2"); echo "[calib] $1: $2 s"; }

t=$SECONDS; calib_bootstrap "$ROOT" "calib, open_clip, papermill, ipykernel"; stage "environment set-up" $((SECONDS - t))
export CALIB_HOME="${CALIB_HOME:-$ROOT}"
export PYTHONHASHSEED=0
cd "$ROOT"

if [ "$profile" = paper ]; then
  data_dir_arg="$(cd "$data_dir_arg" && pwd)"
  n_seeds=5; [ "$quick" = 1 ] && n_seeds=1
  plan_args=(--data-dir "$data_dir_arg" --seeds "$n_seeds")
  [ -n "$backbones_arg" ] && plan_args+=(--backbones "$backbones_arg")
  "$PY" -m calib plan --profile paper "${plan_args[@]}"
  [ "$dry" = 1 ] && exit 0
  # every (dataset, backbone) cell's notebooks, then the tables (calib/experiments/profile.py); with --nproc N the
  # cells are spread over N processes (one per GPU) by torchrun and rank 0 writes the tables
  profile_args=(--data-dir "$data_dir_arg" --tpt-images "$tpt_images")
  [ -n "$backbones_arg" ] && profile_args+=(--backbones "$backbones_arg")
  [ "$quick" = 1 ] && profile_args+=(--quick)
  t=$SECONDS
  if [ "$nproc" -gt 1 ]; then
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m calib profile "${profile_args[@]}"
  else
    "$PY" -m calib profile "${profile_args[@]}"
  fi
  echo "[calib] paper profile done in $((SECONDS - t)) s ($nproc process(es)); figures in $CALIB_HOME/figures," \
    "executed notebooks and per-process timings (profile_rank*.json) in $CALIB_HOME/notebooks/executed"
  exit 0
fi

if [ "$quick" = 1 ]; then
  dataset=toy-quick; pretrained=toy-quick
  nb_params=(-y "{dataset: toy-quick, pretrained: toy-quick, datasets: [toy-quick], backbones: [[calib-toy-vit, toy-quick]], seeds: [0, 1], epochs: 3, ablations: [CFR (default), 'regulariser: none', released behaviour (faithful_release)], variants: [CFR (default), 'regulariser: none'], testbed_core: [0.5], testbed_scale: 0.1, testbed_variants: [CFR (default)]}")
else
  dataset=toy; pretrained=toy
  nb_params=()
fi
data_dir="$("$PY" -c 'from calib.data import default_root; import sys; print(default_root(sys.argv[1]))' "$dataset")"

t=$SECONDS
if [ "$quick" = 1 ]; then "$PY" -m calib data make-toy --root "$data_dir" --scale 0.04
else "$PY" -m calib data make-toy --root "$data_dir"; fi
stage "toy data" $((SECONDS - t))
t=$SECONDS; "$PY" -m calib toy-clip --preset "$pretrained"; stage "toy CLIP training" $((SECONDS - t))
t=$SECONDS; "$PY" -m calib extract --dataset "$dataset" --model calib-toy-vit --pretrained "$pretrained"
stage "feature extraction" $((SECONDS - t))

executed="$CALIB_HOME/notebooks/executed"; mkdir -p "$executed"
stamps="$executed/.stamps"  # a notebook whose inputs are unchanged since its last run is skipped (calib/experiments/stamps.py)
# Notebooks run in two lanes (one CPU thread each).  Method training on the toy is bound by per-op overhead and
# memory passes, not by arithmetic, so two single-threaded processes nearly double throughput.
lane_log="$(mktemp -d)"
run_lane() {  # run_lane NAME NOTEBOOK... ; writes "<seconds> <notebook>" lines to $lane_log/NAME
  local lane="$1"; shift
  for nb in "$@"; do
    local name t0
    name="$(basename "$nb")"
    [ -n "$only" ] && [[ "$name" != "$only"* ]] && continue
    if [ "$force" = 0 ] && "$PY" -m calib.experiments.stamps check "$stamps" "$nb" "$executed/$name" "${nb_params[*]}"; then
      echo "0 $name (up to date: inputs unchanged since its last run; --force re-runs it)" >> "$lane_log/$lane"
      continue
    fi
    t0=$SECONDS
    # --cwd: notebooks run outside the checkout (no path may depend on the working directory)
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY" -m papermill --log-level WARNING -k python3 --cwd "$executed" "$nb" \
      "$executed/$name" "${nb_params[@]}" > "$lane_log/$lane.out" 2>&1 \
      || { echo "[calib] notebook $name failed; see $executed/$name and $lane_log/$lane.out" >&2; return 1; }
    "$PY" -m calib.experiments.stamps write "$stamps" "$nb" "$executed/$name" "${nb_params[*]}"
    echo "$((SECONDS - t0)) $name" >> "$lane_log/$lane"
  done
}
t_nb=$SECONDS
# balanced by their measured cost (toy): 03 + 06 (about 390 s) in one lane, 04 (about 230 s) and the short ones in
# the other.  08 pretrains three toy CLIPs the first time (about 3 min each on one thread, cached afterwards): then
# 04 moves to the first lane.  Every notebook reads only cached features, its own rows and its own toy CLIPs, so
# the order is free.
heavy=(notebooks/03_*.ipynb notebooks/06_*.ipynb)
others=(notebooks/08_*.ipynb)
if [ "$quick" = 0 ] && [ -n "$("$PY" -c 'from calib.studies.pretraining import missing_sources; print(*missing_sources())')" ]; then
  heavy+=(notebooks/04_*.ipynb)
else
  others+=(notebooks/04_*.ipynb)
fi
for nb in notebooks/[0-9][0-9]_*.ipynb; do
  case "$nb" in notebooks/0[3468]_*) ;; *) others+=("$nb") ;; esac
done
run_lane a "${heavy[@]}" & pid_a=$!
run_lane b "${others[@]}" & pid_b=$!
status=0
wait $pid_a || status=1
wait $pid_b || status=1
[ $status = 0 ] || exit 1
while read -r secs name; do stage "notebook $name" "$secs"; done < <(cat "$lane_log"/a "$lane_log"/b 2>/dev/null)
stage "notebooks (2 lanes in parallel, methods included)" $((SECONDS - t_nb))

if [ "$quick" = 0 ] && [ -z "$only" ]; then
  # the README's tables are a function of the result rows and calib's code: refreshed only when either changed
  rows_hash="$(cat "$CALIB_HOME"/results/*.jsonl 2>/dev/null | sha256sum | cut -c1-20)"
  t=$SECONDS
  if [ "$force" = 1 ] || ! "$PY" -m calib.experiments.stamps check "$stamps" "$ROOT/README.md" "$ROOT/README.md" "$rows_hash"; then
    "$PY" -m calib report readme --dataset toy
    "$PY" -m calib.experiments.stamps write "$stamps" "$ROOT/README.md" "$ROOT/README.md" "$rows_hash"
    stage "README tables" $((SECONDS - t))
  else
    stage "README tables (up to date: rows and code unchanged)" $((SECONDS - t))
  fi
fi

echo
echo "[calib] wall time by stage (s):"
for i in "${!stage_names[@]}"; do printf '  %-45s %6s\n' "${stage_names[$i]}" "${stage_secs[$i]}"; done
printf '  %-45s %6s\n' "total" "$SECONDS"
echo "[calib] figures in $CALIB_HOME/figures, executed notebooks in $executed, rows in $CALIB_HOME/results"
