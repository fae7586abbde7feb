#!/usr/bin/env bash
# The end-to-end pipeline on one dataset: train a small U-Net, sample from its EMA weights, measure
# FID + KID + precision/recall/density/coverage against the real images in one feature pass, exact
# bits/dim on held-out images, and collect every number (with provenance) in OUT/results.csv and a
# report. Reruns resume: training continues from its checkpoint, sampling makes only missing shards.
#
#   scripts/pipeline.sh OUT PRESET        PRESET: digits | fashion-mnist | ci
#
# Used by scripts/main.sh (the README's main job) and .ci/run (the CI regression gate, preset ci).
set -euo pipefail
OUT="$1"; PRESET="$2"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="$ROOT/.venv/bin"
# Fixed thread count: the same arithmetic (and so the same numbers) on every machine of this kind.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

case "$PRESET" in
  digits)         # scikit-learn digits, 8x8 grayscale, about 3 minutes of training on 2 cores
    DATA=digits; REAL=digits; HELD=digits; EXP=digits
    MODEL=(--base-channels 32 --channel-mult 1,2 --attention-resolutions 4)
    TRAIN=(--batch-size 64 --lr 1e-3 --steps 1000); NUM=500; NLL_NUM=64; SAMPLE_STEPS=100 ;;
  fashion-mnist)  # Debian's Fashion-MNIST, 28x28 grayscale, about 5 minutes of training on 2 cores
    DATA=fashion-mnist:train; REAL=fashion-mnist:test; HELD=fashion-mnist:test; EXP=fashion-mnist
    MODEL=(--base-channels 16 --channel-mult 1,2,2 --attention-resolutions 7)
    TRAIN=(--batch-size 32 --lr 2e-3 --steps 800); NUM=500; NLL_NUM=64; SAMPLE_STEPS=50 ;;
  ci)             # the CI gate: small, seeded, deterministic (digits are always available)
    DATA=digits; REAL=digits; HELD=digits; EXP=ci-digits
    MODEL=(--base-channels 16 --channel-mult 1,2 --attention-resolutions 4)
    TRAIN=(--batch-size 32 --lr 1e-3 --steps 300); NUM=200; NLL_NUM=16; SAMPLE_STEPS=50 ;;
  *) echo "pipeline.sh: unknown preset '$PRESET' (digits, fashion-mnist, ci)" >&2; exit 2 ;;
esac

mkdir -p "$OUT"
RESULTS="$OUT/results.csv"
CKPT="$OUT/train/checkpoints/latest.pt"
step() { printf '\n== %s\n' "$*"; }

step "train ($PRESET) -> $OUT/train"
"$BIN/iddpm-train" run --data "$DATA" --out "$OUT/train" --resume auto --seed 0 \
  "${MODEL[@]}" "${TRAIN[@]}" --diffusion-steps 1000 --lr-warmup-steps 100 \
  --ema-rates 0.999 --ema-warmup --sample-interval 250 --save-interval 250 \
  --sample-steps "$SAMPLE_STEPS" --log-interval 50

step "sample $NUM images ($SAMPLE_STEPS respaced ancestral steps) -> $OUT/samples"
"$BIN/iddpm-sample" --checkpoint "$CKPT" --num "$NUM" --steps "$SAMPLE_STEPS" --sampler ddpm \
  --seed 0 --out "$OUT/samples"

# Rerunning the measurements would append duplicate rows: start the table afresh.
rm -f "$RESULTS"
step "FID, KID, precision/recall vs $REAL ($NUM images each, legacy-tf Inception)"
"$BIN/iddpm-eval" fid "$REAL" "$OUT/samples/samples.npz" --num "$NUM" --seed 0 --kid \
  --kid-subset-size 100 --pr --bootstrap 200 --json --results "$RESULTS" --experiment "$EXP" --no-progress

step "exact bits/dim on $NLL_NUM images of $HELD (all 1000 timesteps)"
"$BIN/iddpm-eval" nll --checkpoint "$CKPT" --data "$HELD" --num "$NLL_NUM" --seed 0 \
  --out "$OUT/nll" --json --results "$RESULTS" --experiment "$EXP" --no-progress

step "report -> $OUT/report.md"
"$BIN/iddpm-eval" report "$RESULTS" -o "$OUT/report.md"
cat <<EOT

Done. Results:            $RESULTS  (report: $OUT/report.md)
Samples:                  $OUT/samples/samples.npz, grid $OUT/samples/grid.png
Grids during training:    $OUT/train/samples/
TensorBoard logs:         $BIN/tensorboard --logdir $OUT/train/tb
EOT
