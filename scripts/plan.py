"""Rule 'plan': thin entry point; logic in wsiseg.tiling."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import tiling  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
with stage("plan", sm.wildcards.slide, sm.log[0]) as log:
    tiling.run(sm.input.slide, sm.wildcards.slide, sm.params.mpp, sm.input.tissue, sm.input.tissue_json,
               dict(sm.params.model), dict(sm.params.tiling), sm.output.tsv, sm.output.json, log=log.info)
