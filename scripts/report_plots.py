"""Rule 'report_plots': the archive's figures for Snakemake's report; logic in wsiseg.report."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import report  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
with stage("report_plots", "all slides", sm.log[0]) as log:
    report.run_plots(
        summary_csv=sm.input.summary,
        histograms=list(sm.input.histograms),
        out=dict(sm.output.items()),
        log=log.info,
    )
