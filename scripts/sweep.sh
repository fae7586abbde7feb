#!/usr/bin/env bash
# The small scaling sweep committed under results/scaling/ (scikit-learn digits, 8x8):
# 4 widths x 1 depth, checkpoints at 150, 400, 1000 and 2500 steps (batch 32), FID from 256 DDIM-25 samples against
# 512 training images (bootstrap interval), bits/dim estimated from 16 timesteps on 64 images.
# Each run is a local submitit job, two at a time (one torch thread each).
# Then the power-law fits and plots. About 12 minutes on 2 quiet CPU cores.
# Rerunning skips everything already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin}
OUT=${OUT:-runs/scaling-sweep}
RESULTS=${RESULTS:-results/scaling}
mkdir -p "$OUT" "$RESULTS"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$PY/iddpm-train" sweep \
  --widths 32,24,16,8 --depths 1 --steps 150,400,1000,2500 --data digits --out "$OUT" \
  --table "$RESULTS/sweep.csv" --launcher local --max-parallel 2 \
  --batch-size 32 --lr 2e-4 --ema-rates 0.999 --ema-warmup --diffusion-steps 1000 \
  --sample-interval 0 --sample-num 64 --sample-steps ddim25 --log-interval 50 \
  --fid-num 256 --fid-steps 25 --fid-sampler ddim --fid-ref-num 512 --fid-bootstrap 200 \
  --nll-num 64 --nll-estimate 16 --eval-seed 0 --no-progress
# FID and bits/dim against training compute: E + A C^-alpha on the compute frontier (the paper's
# figure); and against parameters at the end of training: A N^-alpha (4 points, 2 parameters).
for y in fid nll; do
  "$PY/iddpm-eval" scaling "$RESULTS/sweep.csv" --x compute --y "$y" --points frontier --out "$RESULTS" --no-progress
  "$PY/iddpm-eval" scaling "$RESULTS/sweep.csv" --x params --y "$y" --fit power --points last --out "$RESULTS" \
    --no-progress
done
