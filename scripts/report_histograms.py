"""Rule 'report_histograms': one slide's object histograms; logic in wsiseg.report."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import report  # noqa: E402
from wsiseg.runner import stage  # noqa: E402

sm = snakemake  # noqa: F821
with stage("report_histograms", sm.wildcards.slide, sm.log[0]) as log:
    report.run_histograms(
        objects_csv=sm.input.objects, slide_id=sm.wildcards.slide, out_json=sm.output.json, log=log.info
    )
