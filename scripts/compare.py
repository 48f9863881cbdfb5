"""Rule 'evaluate': one table of mean metrics, every method on every labeled set."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import metrics  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
with stage("evaluate", "comparison", sm.log[0]) as log:
    metrics.compare(list(sm.input), sm.output[0], log=log.info)
