"""Rule 'evaluate_set': thin entry point; logic in wsiseg.evaluate."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import evaluate  # noqa: E402
from wsiseg.runner import stage  # noqa: E402
from wsiseg.segment import pick_device  # noqa: E402

sm = snakemake  # noqa: F821
# the model block of the config (the workflow's model), or the classical baseline
model_cfg = dict(sm.params.model) or evaluate.BASELINE
with stage("evaluate", f"{sm.wildcards.set}/{sm.wildcards.method}", sm.log[0]) as log:
    device = pick_device(sm.params.device, log.info)
    evaluate.evaluate_set(
        sm.input.sheet,
        model_cfg,
        sm.output.metrics,
        sm.output.overlays,
        device=str(device),
        tta=bool(sm.params.tta),
        log=log.info,
    )
