"""Checkpoint 'triage': one status row per slide from the inspect results; logic in wsiseg.triage."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from wsiseg import triage  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
with stage("triage", "all slides", sm.log[0]) as log:
    triage.triage(slide_jsons=list(sm.input), out_tsv=sm.output[0], log=log.info)
