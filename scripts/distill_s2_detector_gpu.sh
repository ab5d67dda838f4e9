#!/usr/bin/env bash
# Train U-Nets on 2x2 pixel blocks (space-to-depth 2) on one GPU, the maps simulated there: one
# distilled from the shipped detector (labelled there by it; the base-8 detector until
# 2026-11-27, then the 8-16-16-32 one, now the 8-16-16 one, all of the same depth and odds), one
# on the true sources (issue 11).
#
#   bash scripts/distill_s2_detector_gpu.sh INIT.safetensors OUT_DIR
#
# INIT is the CPU-distilled s2 detector of scripts/distill_small_detectors.sh (candidate
# s2-16-32-64 after its 34 epochs: benchmarks/candidates/detector_s2_16-32-64_cpu.safetensors,
# identity 01eb5507783e3555, completeness 0.582). Two runs share the GPU, each with a cosine schedule
# over epochs of N_TRAIN fresh maps (default 20000): "a" continues INIT by distillation (widths
# 16 32 64; batch 64, learning rate 1e-3, seed 21); "b" trains a bigger network on the same blocks
# from scratch on the true sources, without a teacher (widths 16 32 64 128, 483,748 parameters,
# about 0.55x the base-8 network's time on the CPU; batch 64, learning rate 3e-3, seed 22).
# On the CPU both kinds flatten out near 0.58 against the base-8 detector's 0.611, short in the
# faintest bins (0.16-0.19 against 0.23 at F = 0.1-0.2): distilled 16-32-64, 0.573, 0.579, 0.582
# after 60,000, 132,000, 204,000 maps; distilled 16-32-64-128, 0.575 and 0.579 after 60,000 and
# 144,000; on the true sources, after 60,000, 16-32-64 0.580 (distilled: 0.573) and 16-32-64-128
# 0.578 (distilled: 0.575), faster to train without the teacher. The GPU runs say whether 400,000
# maps or more close the gap. A one-epoch probe of both side by side measures maps/s (with the
# teacher), and each run gets the epochs that fit CAP seconds; a run the time limit stops gives
# the best weights of its checkpoint instead (scripts/checkpoint_to_detector.py). SIM (default cuda) names the simulation
# device (a dry run on the CPU: SIM=cpu N_TRAIN=32 PROBE=32 CAP=40).
# PYTHON names the interpreter (default python; python3 on the lent GPU machines, whose venv
# interpreter must be called by its own name).
#
# Not yet run on a GPU. Its first try (2026-11-26, a lent H100) never reached the first step: an
# import check run through a shell wrapper named python (exec python3) printed nothing until the
# time limit. The cause is not known (the likeliest: the wrapper ran itself, if the image's
# python3 calls python), so the script now takes the interpreter from PYTHON, and a driver should
# check the imports under `timeout` first. The CPU dry run above worked (both runs, the probe and
# the checkpoint fallback).
set -euo pipefail
init=$(realpath "$1")
out=$(realpath -m "$2")
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
CAP=${CAP:-400}
SIM=${SIM:-cuda}
N_TRAIN=${N_TRAIN:-20000}
PY=${PYTHON:-python}
PROBE=${PROBE:-1280}
# name batch lr seed widths init teacher ("-": none)
runs=("a 64 1e-3 21 16-32-64 $init default" "b 64 3e-3 22 16-32-64-128 - -")

rate() {  # batch widths: maps/s of one distillation epoch after a warm-up
    "$PY" - "$1" "$2" "$SIM" "$PROBE" <<'PY'
import sys, time
from astrotrunc import PointSourceModel, SourceDetector, Trainer
from astrotrunc.detection import DetectionSimulations
from astrotrunc.detection.estimator import default_detector
bs, widths = int(sys.argv[1]), [int(w) for w in sys.argv[2].split("-")]
device, n = sys.argv[3], int(sys.argv[4])
teacher = default_detector().to(device).eval()
det = SourceDetector.from_model(PointSourceModel.paper(), teacher.flux_thresholds,
                                widths=widths, space_to_depth=2)
data = DetectionSimulations(PointSourceModel.paper(), det.flux_thresholds, n, 64, seed=123,
                            device=device, teacher=teacher)
for timed in (False, True):
    t = time.perf_counter()
    Trainer(max_epochs=1, batch_size=bs, progress=False, device=device).fit(det, data)
print(int(n / (time.perf_counter() - t)))
PY
}

for r in "${runs[@]}"; do
    set -- $r
    rate "$2" "$5" > "$out/rate_$1" 2> "$out/rate_$1.err" &
done
wait
for r in "${runs[@]}"; do
    set -- $r
    maps_s=$(tail -n 1 "$out/rate_$1" 2>/dev/null || true)
    epochs=$("$PY" -c "print(max(1, min(80, int($CAP * ${maps_s:-1000} * 0.85 / $N_TRAIN))))")
    echo "run $1: ${maps_s:-?} maps/s in the probe -> $epochs epochs of $N_TRAIN maps"
    widths=(${5//-/ })
    start=()
    [ "$6" = - ] || start=(--init "$6")
    [ "$7" = - ] || start+=(--teacher "$7")
    (
        T0=$(date +%s)
        timeout "$CAP" "$PY" -m astrotrunc.cli train detector --out "$out/$1.safetensors" \
            "${start[@]}" --widths "${widths[@]}" --space-to-depth 2 \
            --default-flux-threshold 1 --n-train "$N_TRAIN" --n-val 480 --epochs "$epochs" \
            --batch-size "$2" --learning-rate "$3" --seed "$4" --domain-maps 1000 \
            --simulation-device "$SIM" --quiet --checkpoint-dir "$out/ck_$1" \
            --name "astrotrunc-paper-r1-s2-$1 (GPU)" > "$out/log_$1" 2>&1 || true
        [ -f "$out/$1.safetensors" ] || "$PY" scripts/checkpoint_to_detector.py "$out/ck_$1" \
            "$out/$1.safetensors" --widths "${widths[@]}" --space-to-depth 2 \
            --name "astrotrunc-paper-r1-s2-$1 (GPU, checkpoint)" >> "$out/log_$1" 2>&1 \
            || echo "run $1: stopped before its first epoch ended (no checkpoint)"
        if [ -f "$out/$1.safetensors" ]; then
            echo "run $1: $(( $(date +%s) - T0 )) s -> $out/$1.safetensors"
        fi
    ) &
done
wait
