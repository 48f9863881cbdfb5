#!/usr/bin/env bash
# README command 2: run the test suite (unit tests and end-to-end Snakemake runs on
# the real slides in ../shared/data). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest "$@"
