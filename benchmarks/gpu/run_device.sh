#!/usr/bin/env bash
# Everything measured at full size, in one call of the GPU machine, under one deadline, JSON into $OUT.
#
# Steps, in order of value (each rewrites its JSON atomically as soon as it has something, with
# "complete": false until it ends; $OUT/device_run.json is rewritten after every step):
#   1. benchmarks/gpu_full_size.py: the training-step matrix, the default config (batch 8 × 2,
#      eager) first, then compiled, then every eager variant (batch 16 / cache / checkpointing),
#      then the compiled variants; losses, allocated and reserved peaks vs the memory model, MFU
#      → $OUT/gpu_full_size.json
#   2. a 30-step full-size run of the real train.py (stage-1 config, random weights, synthetic
#      phantoms at 448 px from `python -m preprocessing synthetic`): its losses are recorded
#      (whether they fall is a fact in the JSON, not a pass/fail: 30 steps of random weights need
#      not learn); a non-finite loss fails → $OUT/train_30_steps.json
#   3. benchmarks/bench_eval.py --full-size: batched evaluation at batch 16 vs 1 in bf16 (answers
#      compared exactly and within a tolerance, both recorded), then batch 1 vs 16 in fp32 on 8
#      samples: a differing fp32 answer fails the step → $OUT/eval_full_size.json
#   4. benchmarks/gpu_full_size.py --cascade: the clinician's wait, the three-stage cascade at
#      full size on a 100-slice 512² volume, with its TFLOP count → $OUT/cascade_full_size.json
#   + $OUT/device_run.json (exit status, seconds and note of each step, the card) and every
#     step's output in $OUT/run_device.log (six files: the device tool returns at most eight).
#
# Deadline: --deadline-s N (default 520) seconds from the start of this script, passed to every
# step as the absolute Unix time $MINIGPT_DEADLINE (the Python scripts start no case that cannot
# finish before it; a step gets at most the time left and is skipped below its minimum).
# SIGTERM/SIGINT: the running step is stopped (its script writes what it has) and
# device_run.json is written with "complete": false.
#
# Exit status: 0 when every step passed, also when the deadline (or a step's time limit) left
# cases or steps out: that is expected (the compile matrix never fits one call) and
# device_run.json says so ("outcome": "deadline", "cut_by_deadline": [...]); 1 when a step failed
# ("outcome": "failed", "failed_steps": [...]); 2 before any step (bad arguments, a module that
# does not import); 143/130 on SIGTERM/SIGINT. Every file in $OUT is made mode 0644.
#
# The device call's timeout comes from the device time left (see BENCHMARKS.md, "GPU"):
#   bash benchmarks/gpu/run_device.sh --plan --budget-left-s <budget_left_s of the device status>
# prints the timeout_s for the call and the --deadline-s to pass: timeout_s = min(600, budget
# left − $START_S for the machine's start and the transfers), deadline = timeout_s − $WRAP_UP_S.
#
# The machine has torch 2.11, transformers 5.17, peft, ... but not omegaconf, nibabel or pydicom, and
# no network: run benchmarks/gpu/fetch_wheels.sh here first and carry benchmarks/gpu/wheels; this
# script installs them with pip --no-index --no-deps into a --target folder on PYTHONPATH. Never
# `pip install -e .` there (pip would try to replace torch): the code runs from the tree (PYTHONPATH=.).
#
#   device tool:  command "bash benchmarks/gpu/run_device.sh --deadline-s D", carry ["benchmarks/gpu/wheels"],
#                 timeout_s T  (D and T from --plan above; with a full budget: T 600, D 560)
#   CPU check:    OUT=/tmp/device bash benchmarks/gpu/run_device.sh --dry-run   (tiny widths, ≈ 1 minute)
#
# Afterwards, here: python benchmarks/run_all.py --import-device <the returned $OUT folder>
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
DRY=0
DEADLINE_S=520
PLAN=0
BUDGET_S=""
START_S=120   # the device machine's start (minutes when cold) and the transfers, out of the budget
WRAP_UP_S=40  # after the deadline: the last step's stop, device_run.json, returning $OUT
MIN_RUN_S=60  # below this there is nothing worth a start
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1; shift ;;
        --plan) PLAN=1; shift ;;
        --deadline-s|--budget-left-s)
            if ! [[ "${2:-}" =~ ^[0-9]+$ ]] || [ "$2" -le 0 ]; then
                echo "error: $1 needs a positive number of seconds, got '${2:-}'" >&2; exit 2
            fi
            if [ "$1" = --deadline-s ]; then DEADLINE_S=$2; else BUDGET_S=$2; fi
            shift 2 ;;
        *) echo "usage: $0 [--dry-run] [--deadline-s SECONDS] [--plan --budget-left-s SECONDS]" >&2; exit 2 ;;
    esac
done
if [ $PLAN = 1 ]; then  # the device call's timeout and this script's deadline from the budget left
    if [ -z "$BUDGET_S" ]; then echo "error: --plan needs --budget-left-s (the device status's budget_left_s)" >&2; exit 2; fi
    TIMEOUT_S=$(( BUDGET_S - START_S ))
    [ "$TIMEOUT_S" -gt 600 ] && TIMEOUT_S=600
    if [ $(( TIMEOUT_S - WRAP_UP_S )) -lt $MIN_RUN_S ]; then
        echo "error: $BUDGET_S s of device time left: after ${START_S} s for the start and ${WRAP_UP_S} s to wrap up," \
             "less than ${MIN_RUN_S} s would run; do not start the device" >&2
        exit 2
    fi
    echo "timeout_s $TIMEOUT_S"
    echo "deadline_s $(( TIMEOUT_S - WRAP_UP_S ))"
    echo "command: bash benchmarks/gpu/run_device.sh --deadline-s $(( TIMEOUT_S - WRAP_UP_S ))"
    exit 0
fi
if [ -n "$BUDGET_S" ]; then echo "error: --budget-left-s goes with --plan (which prints the --deadline-s to run with)" >&2; exit 2; fi
if [ -z "${OUT:-}" ]; then echo "error: set OUT to the folder for the JSON files" >&2; exit 2; fi
RUN_DEADLINE=$(( $(date +%s) + DEADLINE_S ))
export MINIGPT_DEADLINE=$RUN_DEADLINE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
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
# met as a traceback halfway through the device time (pylibjpeg: compressed DICOM only, not used).
# torch, transformers and peft are imported for real (a broken install imports nothing) and their
# versions go to device_run.json "versions".
PREFLIGHT_LOG="$WORK/preflight.err"
VERSIONS=$(python3 - "$WHEELS" 2>"$PREFLIGHT_LOG" <<'PY'
import importlib, importlib.util, json, sys
modules = ["torch", "torchvision", "transformers", "peft", "sentencepiece", "safetensors", "numpy", "scipy",
           "PIL", "sklearn", "matplotlib", "tqdm", "yaml", "omegaconf", "nibabel", "pydicom"]
missing = [m for m in modules if importlib.util.find_spec(m) is None]
if missing:
    carried = {"omegaconf", "nibabel", "pydicom"}
    hint = f"run benchmarks/gpu/fetch_wheels.sh and carry {sys.argv[1]}" if carried & set(missing) else "carry their wheels"
    sys.exit(f"error: missing Python modules: {', '.join(missing)}: {hint}")
versions = {"python": sys.version.split()[0]}
for name in ("torch", "transformers", "peft"):
    try:
        versions[name] = importlib.import_module(name).__version__
    except Exception as err:  # noqa: BLE001 - any failure to import is the message
        sys.exit(f"error: 'import {name}' fails: {type(err).__name__}: {str(err)[:300]}")
print(json.dumps(versions))
PY
) || {  # nothing ran: said on stderr and in device_run.json ("outcome": "failed"), exit 2
    cat "$PREFLIGHT_LOG" >&2
    python3 - "$OUT/device_run.json" "$(tail -n 1 "$PREFLIGHT_LOG")" "$DEADLINE_S" <<'PY'
import json, os, sys, time
path, message, deadline_s = sys.argv[1:]
status = {"date": time.strftime("%Y-%m-%d %H:%M"), "deadline_s": int(deadline_s), "complete": False,
          "outcome": "failed", "stopped": f"pre-flight: {message.removeprefix('error: ')}", "failed_steps": ["pre-flight"],
          "cut_by_deadline": [], "steps": [], "seconds": 0}
with open(f"{path}.tmp", "w") as f:
    json.dump(status, f, indent=1)
    f.write("\n")
os.replace(f"{path}.tmp", path)
PY
    chmod 0644 "$OUT/device_run.json"
    exit 2
}

GPU_INFO="none (dry run)"
[ $DRY = 1 ] || GPU_INFO=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)
STEPS=()  # JSON objects of device_run.json's "steps"
STOPPED=""
LOG="$OUT/run_device.log"
: > "$LOG"

write_status() {  # write_status COMPLETE(true|false): device_run.json, atomically (temp + rename)
    python3 - "$OUT/device_run.json" "$1" "$DRY" "$GPU_INFO" "$DEADLINE_S" "$RUN_DEADLINE" "$STOPPED" "$VERSIONS" \
        "$OUTCOME" "${STEPS[@]}" <<'PY'
import json, os, sys, time
path, complete, dry, card, deadline_s, deadline, stopped, versions, outcome, *steps = sys.argv[1:]
steps = [json.loads(s) for s in steps]
status = {"date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": dry == "1", "nvidia_smi": card,
          "versions": json.loads(versions), "deadline_s": int(deadline_s), "deadline": int(deadline),
          "complete": complete == "true", "stopped": stopped or None, "outcome": outcome or None,
          "failed_steps": [s["step"] for s in steps if s.get("failed")],
          "cut_by_deadline": [s["step"] for s in steps if s.get("deadline")],
          "steps": steps, "seconds": sum(s["seconds"] for s in steps)}
tmp = f"{path}.tmp{os.getpid()}"
with open(tmp, "w") as f:
    json.dump(status, f, indent=1)
    f.write("\n")
os.replace(tmp, path)
PY
    chmod 0644 "$OUT"/* 2>/dev/null  # readable by others, whatever the umask or the writer's temp file
}

record() {  # record NAME RC SECONDS NOTE [failed|deadline]: a step's row of device_run.json
    local note=${4//\\/\\\\} why=${5:-}
    note=${note//\"/\\\"}
    if [ -z "$why" ] && [ "$2" != 0 ]; then why=failed; fi
    local flag=""
    [ -n "$why" ] && flag=", \"$why\": true"
    [ "$why" = failed ] && FAILED=1
    [ "$why" = deadline ] && DEADLINE_HIT=1
    STEPS+=("{\"step\": \"$1\", \"returncode\": $2, \"seconds\": $3, \"note\": \"$note\"$flag}")
    write_status false
}

CHILD=""; CURRENT=""; CURRENT_START=0; DEADLINE_HIT=0; FAILED=0; OUTCOME=""
on_signal() {  # stop the running step (its script flushes its JSON), record it, write the status
    trap - TERM INT
    STOPPED="SIG$1"
    if [ -n "$CHILD" ]; then
        kill -TERM "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
        record "$CURRENT" null $((SECONDS - CURRENT_START)) "interrupted by SIG$1" interrupted
    fi
    OUTCOME=interrupted
    write_status false
    echo "=== stopped by SIG$1" | tee -a "$LOG"
    exit $([ "$1" = INT ] && echo 130 || echo 143)
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
write_status false

step() {  # step NAME LIMIT_S MIN_S COMMAND...: run under min(limit, time left); skip below MIN_S
    local name=$1 limit=$2 need=$3; shift 3
    local left=$(( RUN_DEADLINE - $(date +%s) )) rc lines
    if [ "$left" -lt "$need" ]; then
        echo "=== $name: skipped, deadline: $left s left, needs $need s" | tee -a "$LOG"
        record "$name" null 0 "skipped: deadline ($left s left, needs $need s)" deadline
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    lines=$(wc -l < "$LOG")
    echo "=== $name (limit ${limit} s): $*" >> "$LOG"
    CURRENT=$name; CURRENT_START=$SECONDS
    # the step's own deadline: its scripts start no case they cannot finish within its limit
    MINIGPT_DEADLINE=$(( $(date +%s) + limit - 5 )) timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1 &
    CHILD=$!
    wait "$CHILD"; rc=$?
    CHILD=""
    echo "=== $name: exit $rc after $((SECONDS - CURRENT_START)) s" >> "$LOG"
    tail -n +"$((lines + 1))" "$LOG" | tail -n 40
    local note="" why=""
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why=deadline; note="stopped at its limit of $limit s"; fi
    if [ -n "${STEP_JSON:-}" ] && [ -f "$STEP_JSON" ]; then  # a script that left cases out for the deadline says so
        local cut
        cut=$(python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(r.get('stopped') or '' if r.get('outcome') == 'deadline' or str(r.get('stopped') or '').startswith('deadline') else '')" "$STEP_JSON" 2>/dev/null)
        if [ -n "$cut" ] && [ "$rc" = 0 ]; then why=deadline; note="$cut"; fi
    fi
    record "$name" "$rc" $((SECONDS - CURRENT_START)) "$note" "$why"
}

if [ $DRY = 1 ]; then
    SIZES=$(python3 -c "from benchmarks.full_size import DRY_RUN_SIZES; print(' '.join(DRY_RUN_SIZES))")
    GPU_ARGS=(--dry-run); IMAGE_PX=128; EVAL_ARGS=(--samples 4 --repeats 1 --batch-sizes 1 4 --max-new-tokens 4)
    TRAIN_EXTRA="run.device=cpu run.num_workers=0 run.batch_size=2"
    # minimum seconds a step needs to start: a tiny dry-run step needs far less than a full-size one
    MIN_MATRIX=5; MIN_PHANTOMS=5; MIN_TRAIN=20; MIN_EVAL=10; MIN_CASCADE=15
else
    SIZES=""; GPU_ARGS=(); IMAGE_PX=448; EVAL_ARGS=(--full-size --samples 32 --repeats 1)
    TRAIN_EXTRA="run.num_workers=8"
    MIN_MATRIX=60; MIN_PHANTOMS=10; MIN_TRAIN=40; MIN_EVAL=30; MIN_CASCADE=45
fi

# 1. the training-step matrix
STEP_JSON="$OUT/gpu_full_size.json" step gpu_full_size 190 $MIN_MATRIX python3 benchmarks/gpu_full_size.py "${GPU_ARGS[@]}" --json "$OUT/gpu_full_size.json"

# 2. 30 steps of the real train.py on synthetic phantoms
step phantoms 30 $MIN_PHANTOMS bash -c "python3 -m preprocessing synthetic --out '$WORK/raw' --scheme msd --n 6 --slices 24 \
    --size $IMAGE_PX && python3 -m preprocessing msd --images '$WORK/raw/imagesTr' --labels '$WORK/raw/labelsTr' \
    --out '$WORK/MSD' --threshold 0.0"
TOKENIZER=$(python3 -c "from benchmarks.full_size import llama2_tokenizer_path as p; t = p(); print(t or '')")
if [ -n "$TOKENIZER" ]; then VOCAB="model.text.tokenizer=$TOKENIZER"; else VOCAB="model.text.vocab_size=512"; fi
# shellcheck disable=SC2086
step train_30_steps 110 $MIN_TRAIN python3 train.py --cfg-path train_configs/stage1_pancreas_detection.yaml --options \
    model.vision.weights=null model.text.path=null model.init_from=null $VOCAB $SIZES \
    datasets.msd_pancreas.root="$WORK/MSD" datasets.msd_pancreas.threshold=null \
    datasets.nih_pancreas.root="$WORK/MSD" datasets.nih_pancreas.threshold=null \
    run.output_dir="$WORK/run" run.max_epoch=1 run.iters_per_epoch=30 run.max_steps=30 run.validate=false \
    run.log_interval=1 run.resume=null run.init_lr=2e-4 run.warmup_steps=5 run.warmup_lr=1e-5 $TRAIN_EXTRA
# the summary of what ran, also when train.py was stopped at its limit (then "complete": false)
start=$SECONDS
if [ -f "$WORK/run/log.jsonl" ]; then
python3 - "$WORK/run/log.jsonl" "$OUT/train_30_steps.json" "$IMAGE_PX" "$DRY" <<'PY'
import json, math, statistics, sys
from pathlib import Path
log, out, px = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
steps = [r for r in rows if r.get("kind") == "step"]
if not steps:
    sys.exit(f"no training step logged in {log}: see run_device.log")
from minigpt4.config import load_config
from minigpt4.io import write_json_atomic
run = load_config(log.parent / "config.yaml").run
losses = [r["loss"] for r in steps]
finite = all(math.isfinite(x) for x in losses)
first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
# a record, not a test: 30 steps of random weights need not learn, so whether the loss falls is
# written down (first and last 5-step means, every loss) and only a non-finite loss fails
summary = {"steps": len(steps), "complete": len(steps) >= 30, "image_size": px, "batch_size": run.batch_size,
           "grad_accum_steps": run.grad_accum_steps, "first_loss": first if finite else None,
           "last_loss": last if finite else None, "losses_finite": finite,
           "loss_falls": finite and len(steps) >= 10 and last < first,
           "losses": [x if math.isfinite(x) else str(x) for x in losses],
           "samples_per_s": statistics.median(r["samples_per_s"] for r in steps[3:] or steps)}
write_json_atomic(out, summary)
print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))
if not finite:
    sys.exit("a full-size training loss is not finite")
PY
rc=$?
record train_losses $rc $((SECONDS - start)) "$([ $rc = 0 ] && echo "losses recorded" || echo "a loss is not finite, or no step was logged")"
else
record train_losses null 0 "no training log: train_30_steps did not run" "$([ $DEADLINE_HIT = 1 ] && echo deadline || echo failed)"
fi

# 3. batched evaluation, batch 16 vs 1 (bf16 recorded; a differing fp32 answer fails the step)
STEP_JSON="$OUT/eval_full_size.json" step eval_full_size 80 $MIN_EVAL python3 benchmarks/bench_eval.py "${EVAL_ARGS[@]}" --fail-on-difference \
    --json "$OUT/eval_full_size.json"

# 4. the clinician's wait: the three-stage cascade at full size on one volume
STEP_JSON="$OUT/cascade_full_size.json" step cascade_full_size 120 $MIN_CASCADE python3 benchmarks/gpu_full_size.py --cascade "${GPU_ARGS[@]}" \
    --json "$OUT/cascade_full_size.json"

[ $DEADLINE_HIT = 1 ] && STOPPED="deadline ($DEADLINE_S s)"
if [ $FAILED = 1 ]; then OUTCOME=failed; elif [ $DEADLINE_HIT = 1 ]; then OUTCOME=deadline; else OUTCOME=complete; fi
write_status "$([ $DEADLINE_HIT = 0 ] && [ $FAILED = 0 ] && echo true || echo false)"
python3 -c "import json, sys; [print(json.dumps(s)) for s in json.load(open(sys.argv[1]))['steps']]" "$OUT/device_run.json"
echo "outcome: $OUTCOME${STOPPED:+ ($STOPPED)}"
[ $FAILED = 0 ]  # exit 0 also when only the deadline left something out (device_run.json: "outcome")
