"""Rule 'segment' (GPU): thin entry point; logic in wsiseg.segment."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import segment  # noqa: E402
from wsiseg.runner import slide_stage  # noqa: E402

sm = snakemake  # noqa: F821
with slide_stage("segment", sm) as log:
    segment.run(
        slide_path=sm.params.path,
        slide_id=sm.wildcards.slide,
        mpp=sm.params.mpp,
        plan_tsv=sm.input.plan,
        plan_json=sm.input.plan_json,
        tissue_png=sm.input.tissue,
        model_cfg=dict(sm.params.model),
        tiling_cfg=dict(sm.config["tiling"]),  # batch size, workers, amp: how, not what (no params)
        device=sm.config["device"],
        clip_to_tissue=sm.params.clip,
        out_store=sm.output.store,
        out_json=sm.output.json,
        threads=sm.threads,
        log=log.info,
    )
