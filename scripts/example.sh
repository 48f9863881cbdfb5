#!/usr/bin/env bash
# README command 1: run the workflow on the bundled synthetic example slide.
# Extra arguments go to snakemake (e.g. --cores 16, --use-conda, --config ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ $# -eq 0 ]; then set -- --cores all; fi
exec .venv/bin/snakemake "$@"
