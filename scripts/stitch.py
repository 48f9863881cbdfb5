"""Rule 'stitch': thin entry point; logic in wsiseg.stitch."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import stitch  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
with stage("stitch", sm.wildcards.slide, sm.log[0]) as log:
    c = sm.params.cfg
    stitch.run(sm.input.store, sm.input.plan_json, sm.input.thumb, sm.input.tissue, sm.wildcards.slide,
               sm.output.mask, sm.output.overlay, sm.output.json, tiff_tile=c["tiff_tile"],
               compression=c["compression"], log=log.info)
