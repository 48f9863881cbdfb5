"""Rule 'stitch': thin entry point; logic in wsiseg.stitch."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import stitch  # noqa: E402
from wsiseg.runner import slide_stage  # noqa: E402

sm = snakemake  # noqa: F821
with slide_stage("stitch", sm) as log:
    c = sm.params.cfg
    stitch.run(
        store_path=sm.input.store,
        plan_json=sm.input.plan_json,
        thumb_png=sm.input.thumb,
        tissue_png=sm.input.tissue,
        slide_id=sm.wildcards.slide,
        out_mask=sm.output.mask,
        out_overlay=sm.output.overlay,
        out_json=sm.output.json,
        tiff_tile=c["tiff_tile"],
        compression=c["compression"],
        log=log.info,
    )
