#!/usr/bin/env bash
# Train candidate r1 detectors side by side on one GPU machine (issue 11), then time the shipped
# detector there. Each run is one process: the simulations (CPU, about 1500 maps/s per core) feed
# the GPU, so several runs use a 16-core GPU machine better than one. A run still going at the
# time limit CAP is stopped and the best weights of its checkpoint are written as its detector
# (scripts/checkpoint_to_detector.py). This is how the base-10 and base-8 detectors' first stages
# were made on an NVIDIA H200 (2026-11-26, CAP=330: every run stopped after 4-5 of 14 epochs).
#
#   CAP=330 bash scripts/train_detector_candidates_gpu.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:-candidates_gpu}")
mkdir -p "$out"
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
CAP=${CAP:-380}
T0=$(date +%s)
runs=("b8 8 3 1 24000" "b6 6 3 1 24000" "b10 10 3 1 20000" "b12 12 3 1 20000"
      "b8d4 8 4 1 20000" "s2d16 16 3 2 24000")
train() {  # name channels depth space_to_depth n_train
    timeout "$CAP" python -m astrotrunc.cli train detector --out "$out/$1.safetensors" \
        --channels "$2" --depth "$3" --space-to-depth "$4" --n-train "$5" --n-val 400 \
        --epochs 14 --batch-size 32 --learning-rate 3e-3 --default-flux-threshold 1.0 --seed 0 \
        --quiet --checkpoint-dir "$out/ck_$1" > "$out/log_$1" 2>&1
    echo "== $1 rc=$? at $(( $(date +%s) - T0 )) s" >> "$out/log_$1"
}
for r in "${runs[@]}"; do train $r & done
wait
for r in "${runs[@]}"; do
    set -- $r
    tail -n 1 "$out/log_$1"
    [ -f "$out/$1.safetensors" ] || python scripts/checkpoint_to_detector.py "$out/ck_$1" \
        "$out/$1.safetensors" --channels "$2" --depth "$3" --space-to-depth "$4" \
        --name "astrotrunc-paper-r1-$1 (checkpoint)"
done
python benchmarks/detection.py --speed-only --speed-repeats 3 --threads 2 --device cuda \
    --output gpu_speed.json
