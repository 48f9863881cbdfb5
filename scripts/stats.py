"""Rule 'stats': thin entry point; logic in wsiseg.stats."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import stats  # noqa: E402
from wsiseg.runner import slide_stage  # noqa: E402

sm = snakemake  # noqa: F821
with slide_stage("stats", sm) as log:
    stats.run(
        mask_path=sm.input.mask,
        slide_json=sm.input.slide_json,
        tissue_json=sm.input.tissue_json,
        plan_json=sm.input.plan_json,
        timing_jsons=list(sm.input.timings),
        classes=list(sm.params.classes),
        out_csv=sm.output.stats,
        objects_csv=sm.output.objects,
        outlines_geojson=sm.output.get("outlines"),
        slide_path=sm.params.path,
        slide_mpp=sm.params.mpp,
        log=log.info,
    )
