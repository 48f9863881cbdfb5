"""Checkpoint 'inspect': record whether a slide can be processed (never fails on bad input);
logic in wsiseg.triage."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import triage  # noqa: E402
from wsiseg.runner import setup_logging  # noqa: E402

sm = snakemake  # noqa: F821
triage.inspect(
    path=sm.params.path,
    slide_id=sm.wildcards.slide,
    mpp=sm.params.mpp,
    out_json=sm.output[0],
    log=setup_logging(sm.log[0]),
)
