#!/usr/bin/env bash
# The test command: set up .venv (scripts/setup_env.sh), then run the whole pytest suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k fid`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# Two workers for the two cores (tests/conftest.py gives each one torch thread).
exec "$ROOT/.venv/bin/python" -m pytest -n 2 "$@"
