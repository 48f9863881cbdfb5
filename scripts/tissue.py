"""Rule 'tissue': thin entry point; logic in wsiseg.tissue."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import tissue  # noqa: E402
from wsiseg.runner import slide_stage  # noqa: E402

sm = snakemake  # noqa: F821
with slide_stage("tissue", sm) as log:
    c = sm.params.cfg
    tissue.run(
        slide_path=sm.params.path,
        slide_id=sm.wildcards.slide,
        mpp=sm.params.mpp,
        out_png=sm.output.png,
        out_thumb=sm.output.thumb,
        out_json=sm.output.json,
        method=c["method"],
        tissue_mpp=c["mpp"],
        min_area_um2=c["min_area_um2"],
        log=log.info,
    )
