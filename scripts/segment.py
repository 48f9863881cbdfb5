"""Rule 'segment' (GPU): thin entry point; logic in wsiseg.segment."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import segment  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
with stage("segment", sm.wildcards.slide, sm.log[0]) as log:
    segment.run(
        slide_path=sm.input.slide,
        slide_id=sm.wildcards.slide,
        mpp=sm.params.mpp,
        plan_tsv=sm.input.plan,
        plan_json=sm.input.plan_json,
        tissue_png=sm.input.tissue,
        model_cfg=dict(sm.params.model),
        tiling_cfg=dict(sm.params.tiling),
        device=sm.params.device,
        clip_to_tissue=sm.params.clip,
        out_store=sm.output.store,
        out_json=sm.output.json,
        threads=sm.threads,
        log=log.info,
    )
