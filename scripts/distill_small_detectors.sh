#!/usr/bin/env bash
# Distil the base-8 r1 detector (widths 8-16-32-64, benchmarks/candidates/detector_b8.safetensors,
# shipped until 2026-11-27) into narrower U-Nets (issue 11: a cheaper network at the same depth),
# then measure each one's depth. It made 8-16-16-32 (shipped 2026-11-27, now
# benchmarks/candidates/detector_8-16-16-32.safetensors) and, from that one, the shipped 8-16-16
# (see below and astrotrunc/data/README.rst).
#
#   bash scripts/distill_small_detectors.sh OUT_DIR [DEVICE]
#
# Each candidate starts from the teacher's strongest channels (--init TEACHER, network slimming)
# and learns its per-pixel odds on fresh simulations (--teacher TEACHER); TEACHER (a detector
# file) is the base-8 detector by default ("default" distils the shipped detector). DEVICE
# (default: cpu) is where the maps are simulated and the teacher labels them; on a GPU, raise
# EPOCHS and N_TRAIN (the trainer uses the GPU by default). Candidates (widths, full resolution
# first; ONNX Runtime network time in batches of 16 on the 2-core CPU, two threads, six
# interleaved rounds in one process, 2026-11-26, session 10; medians, fastest in brackets):
#
#   8 16 32 64   (base 8, the teacher) 121,141 parameters, 3.66 (3.34) ms/map
#   8 8 16 32    32,797 parameters, 3.22 (2.82) ms/map
#   8 16 16 32   42,277 parameters, 3.21 (2.95) ms/map
#
# Session 9 had timed these two at 2.2-2.6 and 2.7-3.4 against 3.8-4.0 ms/map, in separate runs
# at a slow hour; interleaved, the saving is about 12 %, not a quarter: halving level 1 (64^2
# pixels, 16 -> 8 channels) saved nothing measurable. In the same rounds, with random weights,
# 16-16-32-64 took 4.50 ms (level 0 twice as wide: +23 %) and the same U-Net on 2 x 2 pixel
# blocks (--space-to-depth 2, widths 16 32 64, 118,372 parameters) 1.80 ms: the full-resolution
# level is where the time goes. (Parameters of UNet(1, 13, ...): the 13 flux-threshold channels.)
#
# Run on 2026-11-26 on the 2-core CPU (the same recipe by a scratch script, 16 epochs of 8000
# maps, learning rate 2e-3, batch 32; 2827 s): 8-8-16-32 reached a validation soft
# cross-entropy of 0.00872 against the teacher's own 0.00774. On the 200 held-out maps of
# ``python benchmarks/detection.py --threads 1 --speed-repeats 0 --no-photutils-depth --detector
# FILE`` (purity >= 0.95) its completeness is 0.592 against the shipped detector's 0.611 (bins
# 0.1 to 10: 0.203 0.317 0.416 0.528 0.639 0.751 against 0.233 0.342 0.448 0.549 0.660 0.769).
# After epoch 5 it was already 0.588: the loss of depth is the narrower network's, not the
# training's length. Eight more epochs with a logit-matching term added to the loss gave 0.594.
# Trained from scratch on the true sources on a GPU, the base-4 network (30,529 parameters) had
# reached 0.584 after 480,000 maps (scripts/train_small_detectors_gpu.sh).
# 8-16-16-32, this script's command with --n-train 6000 --epochs 10 on the CPU (39.5 min, 1.3 GB
# peak RSS): validation soft cross-entropy 0.00781 (0.00790 after epoch 4); completeness 0.611,
# F50 1.29, the bins 0.1 to 10: 0.234 0.340 0.451 0.548 0.659 0.768, and above 10 within 0.003 of
# the shipped detector's: its depth, within the errors (0.005-0.009) in every bin. With
# matched-filter fluxes (no flux estimator trained for it yet) and ONNX Runtime, two threads, in
# alternating runs with the shipped detector (which has its learned fluxes, 2.4-2.7 ms of the
# map's time against 0.4-0.7): 8.0-9.2 against 11.5-13.6 ms per 128^2 map, find_batch 3.5-3.7
# against 3.8-4.9 ms/map, 1.38-1.44 against 1.95-2.24 s for 2048^2. Its network alone: 2.7-3.4
# ms/map in batches, against 3.8-4.0.
# Remade in session 10 by the same command (1948 s; 0.0078143): completeness 0.611, F50 1.29,
# bins 0.1 to 1000 0.235 0.340 0.452 0.549 0.660 0.768 0.846 0.895 0.938 0.955 0.983 0.987; the
# shipped detector since 2026-11-27, when OpenVINO ran its network 12-17 % faster than the
# base-8 one's (astrotrunc/data/README.rst). Timed in session 10 in
# one process against the base-8 detector, both with their own learned photometry (5 and 8
# interleaved rounds, medians): 12.8 / 13.9 against 13.5 / 13.7 ms per 128^2 map, find_batch 4.48
# / 4.60 against 4.54 / 4.67 ms/map, 2048^2 1.48 / 1.75 against 1.77 / 1.83 s; not enough to
# replace the shipped models (its retrained photometry also had two 68 % cells at 71-72 %).
# 4-16-16-32 (the full-resolution level halved; with OpenVINO its untrained network took 1.96 and
# 2.77 against 2.91 and 3.39 ms per 128^2 map, two interleaved runs), distilled from the shipped
# 8-16-16-32 detector (session 17, 2026-11-27: this recipe with --widths 4 16 16 32 --init default
# --teacher default --n-train 6000 --epochs 10, one thread): validation soft cross-entropy 0.01408
# after epoch 1 and 0.01008 after epoch 5, where 8-16-16-32 had 0.00790 after epoch 4 and 8-8-16-32
# ended at 0.00872 (completeness 0.592). Stopped after epoch 5, far from the depth.
# s2-16-32-64 (2 x 2 pixel blocks; the network in half the time), this script's command with
# --n-train 6000 --epochs 10 on the CPU (1195 s, 1.1 GB): validation soft cross-entropy 0.0151
# after epoch 1, 0.01014 at the end (teacher 0.0077); completeness 0.573, F50 1.84, bins 0.1 to
# 10: 0.163 0.282 0.396 0.502 0.618 0.738 (at odds > 5: 0.339 against 0.415). Twelve more epochs
# (--init that file --learning-rate 1e-3 --seed 8; 2623 s): 0.00952 (seed 8's validation maps),
# completeness 0.579, F50 1.84, bins 0.177 0.287 0.401 0.506 0.627 0.744 (odds > 5: 0.355).
# Twelve more (--init that file --learning-rate 1e-3 --seed 9, one thread; 1776 s, session 11;
# kept as benchmarks/candidates/detector_s2_16-32-64_cpu.safetensors):
# 0.00943 (seed 9's), completeness 0.582, F50 1.84, bins 0.186 0.294 0.403 0.507 0.631 0.746
# (odds > 5: 0.361). So 0.573, 0.579, 0.582 after 60,000, 132,000 and 204,000 maps: about
# +0.005 per doubling of the maps, which would need millions of maps to reach 0.611 -- the
# network's capacity, not only the training's length, holds it back. Its network:
# 2.64 against 5.49 ms/map for the shipped one (interleaved, a slow hour); with matched-filter
# fluxes for both, find_batch 3.41 against 6.16 ms/map, 2048^2 1.28 against 2.09 s, single maps
# 12.6 against 15.9 ms. Starting it from the shipped detector's levels 1-3 (which have its levels'
# resolutions and widths) did not help: 0.01252 against 0.01268 after two epochs.
# 8-16-16 (depth 2: the 8-16-16-32 detector without its deepest level; 19,285 parameters) and 8-16
# (depth 1), distilled from the shipped 8-16-16-32 detector (session 18, 2026-11-27: this recipe
# with TEACHER=default, i.e. --widths 8 16 16 --init default --teacher default --n-train 6000
# --epochs 10, one thread each, side by side; narrowed_weights gives a shallower network the
# teacher's levels down to its depth). 8-16-16: validation soft cross-entropy 0.00828 after epoch
# 1, 0.00820 after 4 (completeness 0.607 then), 0.008113 at the end (epoch 9; about 4 min an
# epoch); completeness 0.612, F50 1.29, purity 0.954 on 32,636; bins 0.1 to 1000 0.241 0.339
# 0.449 0.547 0.661 0.769 0.846 0.898 0.938 0.956 0.983 0.987, every one within 0.006 (one
# error) of the 8-16-16-32 detector's; at odds > 5, 0.414 (8-16-16-32: 0.416). Shipped since
# (astrotrunc/data/detector_paper.safetensors, identity c0e740dd420514f9). Its network
# (OpenVINO, two threads, paired with the shipped one, 12 rounds): -0.29 ms per 128^2 map (se
# 0.11) one at a time, -0.24 (se 0.08) in batches of 16, at 3.25 and 2.92 ms. 8-16: 0.01045 after
# epoch 1 and 0.00967 after 4, where 4-16-16-32 had stopped at 0.01008: stopped.
set -euo pipefail
out=$(realpath -m "${1:-distilled_detectors}")
device=${2:-cpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
EPOCHS=${EPOCHS:-16}
N_TRAIN=${N_TRAIN:-8000}
root=$(cd "$(dirname "$0")/.." && pwd)
TEACHER=${TEACHER:-$root/benchmarks/candidates/detector_b8.safetensors}
sim=()
[ "$device" = cpu ] || sim=(--simulation-device "$device")

# CANDIDATES: which ones (default all three); s2-16-32-64 runs on 2 x 2 pixel blocks and cannot
# start from the teacher's weights (another space-to-depth), so it learns from scratch
for name in ${CANDIDATES:-w8-8-16-32 w8-16-16-32 s2-16-32-64}; do
    widths=${name#w}; widths=${widths#s2-}; widths=${widths//-/ }  # w8-8-16-32 -> 8 8 16 32
    case $name in
        w*) arch="--widths $widths --init $TEACHER" lr=2e-3 ;;
        s2-*) arch="--widths $widths --space-to-depth 2" lr=3e-3 ;;
        *) echo "unknown candidate $name" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC2086
    python -m astrotrunc.cli train detector $arch --teacher "$TEACHER" \
        --default-flux-threshold 1 --n-train "$N_TRAIN" --n-val 480 --epochs "$EPOCHS" \
        --batch-size 32 --learning-rate "$lr" --seed 7 --domain-maps 1000 "${sim[@]}" \
        --name "astrotrunc-paper-r1-${name#w} (distilled)" --checkpoint-dir "$out/ck_$name" \
        --out "$out/$name.safetensors" --quiet > "$out/train_$name.log" 2>&1
    OMP_NUM_THREADS=1 python benchmarks/detection.py --threads 1 --speed-repeats 0 \
        --no-photutils-depth --detector "$out/$name.safetensors" > "$out/depth_$name.log" 2>&1
    grep "^r1 F_th" "$out/depth_$name.log" | head -n 1
done
echo "done: $out/*.safetensors; depth in $out/depth_*.log (compare with the teacher's 0.611)"
