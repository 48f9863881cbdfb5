#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv from requirements.txt.
# Idempotent: does nothing when .venv already matches requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.requirements.sha256"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed (Snakemake 9)")'
echo "setting up $VENV (first run only) ..." >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >&2
# torch first, on its own: with the CPU build already present the rest installs nothing from CUDA
"$VENV/bin/pip" install -q "$(grep '^torch==' requirements.txt)" >&2
"$VENV/bin/pip" install -q -r requirements.txt >&2
"$VENV/bin/pip" install -q --no-deps -e . >&2
echo "$want" > "$stamp"
