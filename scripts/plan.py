"""Rule 'plan': thin entry point; logic in wsiseg.plan."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import plan  # noqa: E402
from wsiseg.runner import slide_stage  # noqa: E402

sm = snakemake  # noqa: F821
with slide_stage("plan", sm) as log:
    plan.run(
        slide_path=sm.params.path,
        slide_id=sm.wildcards.slide,
        mpp=sm.params.mpp,
        tissue_png=sm.input.tissue,
        tissue_json=sm.input.tissue_json,
        model_cfg=dict(sm.params.model),
        tiling_cfg=dict(sm.params.tiling),
        out_tsv=sm.output.tsv,
        out_json=sm.output.json,
        log=log.info,
    )
