"""Rule 'aggregate': summary.csv over all slides; logic in wsiseg.aggregate."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import aggregate  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
with stage("aggregate", "all slides", sm.log[0]) as log:
    aggregate.run(
        stats_csvs=list(sm.input.stats), slide_jsons=list(sm.input.slides), out_csv=sm.output[0], log=log.info
    )
