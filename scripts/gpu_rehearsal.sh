#!/usr/bin/env bash
# The one prepared GPU check of issue 20 (item 7), run on the GPU machine in the machine's own environment:
#   1. the GPU tests (tests/test_gpu.py) and the lane-vs-single equalities (tests/test_lanes.py) on CUDA;
#   2. python -m calib rehearse (every notebook's method runs at the real shapes, extraction throughput);
#   3. a cold toy ./run_all.sh (fresh caches: the toy CLIPs are trained there);
#   4. ./run_all.sh --profile paper --quick on fixture data with random RN50 and ViT-L/14-336;
#   5. the projection-training step profiled on CUDA (scripts/profile_method.py: ms per step at fp32, tf32 and bf16,
#      host synchronisations per pass, the kernel table) at Waterbirds and a tenth of CelebA's size;
# each step's log, the rehearsal report and summary.json go to $OUT (the folder the GPU machine sends back).
# STEPS picks which run (default all: "tests rehearsal toy paper profile"), so a short device session can run
# the rehearsal alone first and the rest in a second call.
#
# There (device tool; wheels from scripts/gpu_wheels.sh, carried):  run  command="scripts/gpu_rehearsal.sh"
#   carry=[".whl"]  timeout_s=590.  Here, on the CPU, at a small size first:
#   OUT=/tmp/gpu_out FRACTION=0.002 SEEDS=0 EPOCHS=2 BACKBONES=RN50-quickgelu SKIP_TOY=1 PAPER_DATASETS=metashift \
#   scripts/gpu_rehearsal.sh   (about 10 min on 2 cores, most of it M2IB in 07_attribution)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/gpu_out}"
FRACTION="${FRACTION:-0.05}"     # share of every split in the rehearsal (plan scales it up linearly)
SEEDS="${SEEDS:-0 1 2 3 4}"      # rehearsal seeds (lanes)
EPOCHS="${EPOCHS:-100}"          # rehearsal epochs (the release's 100)
LAYOUT_IMAGES="${LAYOUT_IMAGES:-1024}"  # synthetic JPEGs per dataset in its release layout (extraction, TPT, maps)
PER_IMAGE="${PER_IMAGE:-4}"      # test images TPT and the attribution maps are timed on
PROFILE_CELEBA="${PROFILE_CELEBA:-0.1}"  # share of CelebA the step profile trains on (1 epoch, 5 lanes)
DATASETS="${DATASETS:-waterbirds,celeba,metashift,chexpert}"
BACKBONES="${BACKBONES:-RN50-quickgelu,ViT-L-14-336-quickgelu}"
SKIP_TOY="${SKIP_TOY:-0}"        # 1: leave out the cold toy run_all (minutes on a CPU)
STEPS="${STEPS:-tests rehearsal toy paper profile}"
[ "$SKIP_TOY" = 1 ] && STEPS="${STEPS//toy/}"
want() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
PAPER_DATASETS="${PAPER_DATASETS:-waterbirds celeba metashift chexpert}"  # fixtures the quick paper profile runs
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONHASHSEED=0
if [ -d .whl ] && ! "$PY" -c 'import open_clip, papermill, ipykernel' 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "[gpu] installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" CALIB_USE_CURRENT_ENV=1 PYTHON="$PY"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

steps=()
step() {  # step NAME LOG COMMAND...: run, log to $OUT/LOG, record rc and seconds
  local name="$1" log="$2" t0=$SECONDS rc
  shift 2
  echo "[gpu] $name ..."
  "$@" > "$OUT/$log" 2>&1
  rc=$?
  steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"log\": \"$log\"}")
  echo "[gpu] $name: rc $rc, $((SECONDS - t0)) s"
}

{ nvidia-smi 2>&1 || true; "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__,
  "cuda", torch.version.cuda, "available", torch.cuda.is_available())'; } > "$OUT/env.txt" 2>&1

want tests && step "gpu tests" pytest_gpu.log "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py \
  tests/test_lanes.py tests/test_precision_memory.py
want rehearsal && step "rehearsal" rehearsal.txt env CALIB_HOME="$WORK/rehearse" "$PY" -m calib rehearse \
  --datasets "$DATASETS" --backbones "$BACKBONES" --fraction "$FRACTION" --seeds $SEEDS --epochs "$EPOCHS" \
  --layout-images "$LAYOUT_IMAGES" --per-image "$PER_IMAGE" --out "$OUT/rehearsal.json"
if want toy; then
  step "cold toy run_all" run_all_toy.log env CALIB_HOME="$WORK/toy" ./run_all.sh --use-current-env
  mkdir -p "$OUT/toy_figures" && cp "$WORK"/toy/figures/*.md "$OUT/toy_figures/" 2>/dev/null
fi
if want paper; then
  "$PY" -c 'import sys; from tests.fixtures import write_paper_data_dir; write_paper_data_dir(sys.argv[1])' "$WORK/data"
  for ds in waterbirds celeba metashift chexpert; do
    case " $PAPER_DATASETS " in *" $ds "*) ;; *) rm -rf "${WORK:?}/data/$ds" ;; esac
  done
  step "paper profile quick" paper_quick.log env CALIB_HOME="$WORK/paper" ./run_all.sh --use-current-env \
    --profile paper --quick --data-dir "$WORK/data" --backbones "${BACKBONES//,/:random,}:random"
fi
if want profile; then
  device=cuda; "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' || device=cpu
  vit="${BACKBONES##*,}"
  for spec in "cfr celeba $PROFILE_CELEBA" "clip_erm celeba $PROFILE_CELEBA" "cfr waterbirds 1.0" \
      "contrastive_adapter waterbirds 1.0" "groupdro waterbirds 1.0"; do
    read -r method ds frac <<< "$spec"
    step "profile $method $ds" "profile_${method}_${ds}.txt" "$PY" scripts/profile_method.py --dataset "$ds" \
      --backbone "$vit" --fraction "$frac" --method "$method" --lanes 5 --epochs 1 --repeats 1 --device "$device" \
      --precision fp32 tf32 bf16 --rows 25
  done
fi

printf '{"out": "%s", "fraction": %s, "steps": [%s]}\n' "$OUT" "$FRACTION" "$(IFS=,; echo "${steps[*]}")" \
  > "$OUT/summary.json"
cat "$OUT/summary.json"
[ -f "$OUT/rehearsal.txt" ] && tail -n 40 "$OUT/rehearsal.txt"
grep -h "ms per step\|host synchronisations" "$OUT"/profile_*.txt 2>/dev/null
