#!/usr/bin/env bash
# Train a detector further on one GPU, its maps simulated on the GPU too (issue 11).
#
#   bash scripts/finetune_detector_gpu.sh INIT.safetensors OUT_DIR [CHANNELS [DEPTH]]
#
# Three runs of `astrotrunc train detector --init ... --simulation-device cuda`, each starting
# from the last one's file, on a decaying schedule (learning rate 2e-3, 1.5e-3, then 7e-4; 8, 22
# and 12 epochs of 20000 fresh maps; seeds 7, 8, 9). With the maps simulated on the GPU, one run
# trains about 1260 maps/s on an NVIDIA H200 with a second run beside it (the GPU 96 % busy),
# against about 330 maps/s per run when six runs shared it with CPU simulations. A run stopped by
# the time limit CAP (seconds) gives the best weights of its checkpoint instead
# (scripts/checkpoint_to_detector.py).
#
# The shipped base-8 detector (astrotrunc/data/README.rst) was made so on 2026-11-26, from
# b8_cpu.safetensors (base 8, depth 3: four epochs on a GPU with CPU simulations, then three on
# the CPU), in 127 + 320 + 181 s, and then renamed astrotrunc-paper-r1-b8.
set -euo pipefail
init=$(realpath "$1")
out=$(realpath -m "$2")
channels=${3:-8}
depth=${4:-3}
CAP=${CAP:-600}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
stage=0
for run in "8 2e-3 7" "22 1.5e-3 8" "12 7e-4 9"; do
    set -- $run
    stage=$((stage + 1))
    T0=$(date +%s)
    timeout "$CAP" python -m astrotrunc.cli train detector --out "$out/stage$stage.safetensors" \
        --init "$init" --channels "$channels" --depth "$depth" --n-train 20000 --n-val 400 \
        --epochs "$1" --batch-size 32 --learning-rate "$2" --default-flux-threshold 1.0 \
        --seed "$3" --simulation-device cuda --quiet --checkpoint-dir "$out/ck_stage$stage" \
        --name "astrotrunc-paper-r1-b$channels (GPU)" > "$out/stage$stage.log" 2>&1 || true
    [ -f "$out/stage$stage.safetensors" ] || python scripts/checkpoint_to_detector.py \
        "$out/ck_stage$stage" "$out/stage$stage.safetensors" --channels "$channels" \
        --depth "$depth" --name "astrotrunc-paper-r1-b$channels (GPU)"
    echo "stage $stage: $(( $(date +%s) - T0 )) s -> $out/stage$stage.safetensors"
    init="$out/stage$stage.safetensors"
done
