"""Rule 'example_slide': writes the synthetic example slide (also usable as a CLI)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg.runner import stage  # noqa: E402
from wsiseg.synthetic import make_example_slide  # noqa: E402

if "snakemake" in globals():
    sm = snakemake  # noqa: F821
    with stage("example_slide", "synthetic", sm.log[0]):
        make_example_slide(sm.output[0])
else:
    make_example_slide(sys.argv[1] if len(sys.argv) > 1 else "resources/example/synthetic_he.tif")
