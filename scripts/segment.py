"""Rule 'segment' (GPU): thin entry point; logic in wsiseg.segment."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import segment  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
with stage("segment", sm.wildcards.slide, sm.log[0]) as log:
    segment.run(sm.input.slide, sm.wildcards.slide, sm.params.mpp, sm.input.plan, sm.input.plan_json,
                sm.input.tissue, dict(sm.params.model), dict(sm.params.tiling), sm.params.device, sm.params.clip,
                sm.output.store, sm.output.json, threads=sm.threads, log=log.info)
