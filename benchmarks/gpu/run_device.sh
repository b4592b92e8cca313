#!/usr/bin/env bash
# Everything issue 11 measures at full size, in one call of the GPU machine (< 8 minutes), JSON into $OUT.
#
#   1. benchmarks/gpu_full_size.py: training-step matrix (checkpointing off/partial/on and the default
#      batch 8 × 2, × compile, × feature cache): samples/s, MFU, peak vs predicted memory
#      → $OUT/gpu_full_size.json
#   2. a 30-step full-size run of the real train.py (stage-1 config, random weights, synthetic phantoms
#      at 448 px from `python -m preprocessing synthetic`): the loss must fall → $OUT/train_30_steps.json
#   3. benchmarks/bench_eval.py --full-size: batched evaluation at batch 16 vs 1 (identical answers,
#      speed ratio) → $OUT/eval_full_size.json
#   + $OUT/device_run.json: exit status and seconds of each step, the card (nvidia-smi); every
#     step's output in $OUT/run_device.log (five files: the device tool returns at most eight).
#
# The machine has torch 2.11, transformers 5.17, peft, ... but not omegaconf, nibabel or pydicom, and
# no network: run benchmarks/gpu/fetch_wheels.sh here first and carry benchmarks/gpu/wheels; this
# script installs them with pip --no-index --no-deps into a --target folder on PYTHONPATH. Never
# `pip install -e .` there (pip would try to replace torch): the code runs from the tree (PYTHONPATH=.).
#
#   device tool:  command "bash benchmarks/gpu/run_device.sh", carry ["benchmarks/gpu/wheels"], timeout_s 540
#   CPU check:    OUT=/tmp/device bash benchmarks/gpu/run_device.sh --dry-run   (tiny widths, minutes)
#
# Afterwards: copy $OUT/*.json into benchmarks/results/ and run `python benchmarks/run_all.py --report-only`.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; elif [ -n "${1:-}" ]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
if [ -z "${OUT:-}" ]; then echo "error: set OUT to the folder for the JSON files" >&2; exit 2; fi
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/minigpt_device.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

WHEELS=benchmarks/gpu/wheels
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WHEELS"/*.whl || { echo "error: installing the carried wheels from $WHEELS failed" >&2; exit 2; }
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# every module the steps import, checked before any step runs: a missing one is named here, not
# met as a traceback halfway through the device time (pylibjpeg: compressed DICOM only, not used)
python3 - "$WHEELS" <<'PY' || exit 2
import importlib.util, sys
modules = ["torch", "torchvision", "transformers", "peft", "sentencepiece", "safetensors", "numpy", "scipy",
           "PIL", "sklearn", "matplotlib", "tqdm", "yaml", "omegaconf", "nibabel", "pydicom"]
missing = [m for m in modules if importlib.util.find_spec(m) is None]
if missing:
    carried = {"omegaconf", "nibabel", "pydicom"}
    hint = f"run benchmarks/gpu/fetch_wheels.sh and carry {sys.argv[1]}" if carried & set(missing) else "carry their wheels"
    sys.exit(f"error: missing Python modules: {', '.join(missing)}: {hint}")
PY

STEPS=()  # JSON fragments for device_run.json
LOG="$OUT/run_device.log"
: > "$LOG"
step() {  # step NAME TIMEOUT_S COMMAND...: run, append the output to $LOG, record status and seconds
    local name=$1 limit=$2; shift 2
    local start=$SECONDS rc
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | tail -n 40
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    STEPS+=("{\"step\": \"$name\", \"returncode\": $rc, \"seconds\": $((SECONDS - start))}")
}

GPU_INFO="none (dry run)"
if [ $DRY = 1 ]; then
    SIZES=$(python3 -c "from benchmarks.full_size import DRY_RUN_SIZES; print(' '.join(DRY_RUN_SIZES))")
    GPU_ARGS=(--dry-run); IMAGE_PX=128; EVAL_ARGS=(--samples 4 --repeats 1 --batch-sizes 1 4 --max-new-tokens 4)
    TRAIN_EXTRA="run.device=cpu run.num_workers=0 run.batch_size=2"
else
    GPU_INFO=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)
    SIZES=""; GPU_ARGS=(--time-budget 140); IMAGE_PX=448; EVAL_ARGS=(--full-size --samples 32 --repeats 1)
    TRAIN_EXTRA="run.num_workers=8"
fi

# 1. the training-step matrix
step gpu_full_size 190 python3 benchmarks/gpu_full_size.py "${GPU_ARGS[@]}" --json "$OUT/gpu_full_size.json"

# 2. 30 steps of the real train.py on synthetic phantoms
step phantoms 60 bash -c "python3 -m preprocessing synthetic --out '$WORK/raw' --scheme msd --n 6 --slices 24 \
    --size $IMAGE_PX && python3 -m preprocessing msd --images '$WORK/raw/imagesTr' --labels '$WORK/raw/labelsTr' \
    --out '$WORK/MSD' --threshold 0.0"
TOKENIZER=$(python3 -c "from benchmarks.full_size import llama2_tokenizer_path as p; t = p(); print(t or '')")
if [ -n "$TOKENIZER" ]; then VOCAB="model.text.tokenizer=$TOKENIZER"; else VOCAB="model.text.vocab_size=512"; fi
# shellcheck disable=SC2086
step train_30_steps 130 python3 train.py --cfg-path train_configs/stage1_pancreas_detection.yaml --options \
    model.vision.weights=null model.text.path=null model.init_from=null $VOCAB $SIZES \
    datasets.msd_pancreas.root="$WORK/MSD" datasets.msd_pancreas.threshold=null \
    datasets.nih_pancreas.root="$WORK/MSD" datasets.nih_pancreas.threshold=null \
    run.output_dir="$WORK/run" run.max_epoch=1 run.iters_per_epoch=30 run.max_steps=30 run.validate=false \
    run.log_interval=1 run.resume=null run.init_lr=2e-4 run.warmup_steps=5 run.warmup_lr=1e-5 $TRAIN_EXTRA
python3 - "$WORK/run/log.jsonl" "$OUT/train_30_steps.json" "$IMAGE_PX" "$DRY" <<'PY'
import json, statistics, sys
from pathlib import Path
log, out, px = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if not log.is_file():
    sys.exit(f"no training log at {log}: see train_30_steps.log")
rows = [json.loads(line) for line in log.read_text().splitlines()]
steps = [r for r in rows if r.get("kind") == "step"]
if len(steps) < 10:
    sys.exit(f"only {len(steps)} training steps logged in {log}")
from minigpt4.config import load_config
run = load_config(log.parent / "config.yaml").run
losses = [r["loss"] for r in steps]
first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
summary = {"steps": len(steps), "image_size": px, "batch_size": run.batch_size, "grad_accum_steps": run.grad_accum_steps,
           "first_loss": first, "last_loss": last, "loss_falls": last < first - 0.05, "losses": losses,
           "samples_per_s": statistics.median(r["samples_per_s"] for r in steps[3:])}
from minigpt4.io import write_json_atomic
write_json_atomic(out, summary)
print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
# the tiny dry-run model need not learn in 30 steps; the full-size run must
sys.exit(0 if summary["loss_falls"] or sys.argv[4] == "1" else "the full-size training loss did not fall in 30 steps")
PY
rc=$?
STEPS+=("{\"step\": \"train_loss_falls\", \"returncode\": $rc, \"seconds\": 0}")

# 3. batched evaluation, batch 16 vs 1
step eval_full_size 90 python3 benchmarks/bench_eval.py "${EVAL_ARGS[@]}" --json "$OUT/eval_full_size.json"

python3 - "$OUT/device_run.json" "$DRY" "$GPU_INFO" "${STEPS[@]}" <<'PY'
import json, sys, time
from minigpt4.io import write_json_atomic
steps = [json.loads(s) for s in sys.argv[4:]]
write_json_atomic(sys.argv[1], {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": sys.argv[2] == "1",
                                "nvidia_smi": sys.argv[3], "steps": steps, "seconds": sum(s["seconds"] for s in steps)})
print(json.dumps(steps))
PY
for s in "${STEPS[@]}"; do case $s in *'"returncode": 0,'*) ;; *) exit 1 ;; esac; done
