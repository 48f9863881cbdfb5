"""Rule 'provenance': provenance.json from the slide's stage records; logic in wsiseg.provenance."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import provenance  # noqa: E402
from wsiseg.runner import stage, write_json  # noqa: E402

sm = snakemake  # noqa: F821
with stage("provenance", sm.wildcards.slide, sm.log[0]) as log:
    prov = provenance.build(dict(sm.input.items()))
    write_json(sm.output[0], prov)
    log.info(f"{', '.join(prov['stages'])} -> {sm.output[0]} (wsiseg {prov['wsiseg_version']}, {prov['git_commit']})")
