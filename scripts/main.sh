#!/usr/bin/env bash
# The main job: set up .venv, then run the pipeline (scripts/pipeline.sh) on the embedded default
# data: Fashion-MNIST when Debian's dataset-fashion-mnist is installed, else scikit-learn digits.
# Output in runs/main/ (or the folder given as first argument); a rerun resumes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
OUT="${1:-$ROOT/runs/main}"
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    PRESET=fashion-mnist
else
    PRESET=digits
    echo "[main] Fashion-MNIST not installed: using scikit-learn digits (8x8) instead" >&2
fi
exec bash "$ROOT/scripts/pipeline.sh" "$OUT" "$PRESET"
