"""Rule 'evaluate_set': thin entry point; logic in wsiseg.evaluate."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg import classical, evaluate  # noqa: E402
from wsiseg.runner import stage  # noqa: E402
from wsiseg.segment import pick_device  # noqa: E402

sm = snakemake  # noqa: F821
model_cfg = dict(sm.params.model)
classical_model = model_cfg.get("format") == "classical"  # `model:` is the classical model with its settings
baseline = sm.wildcards.method == "classical-baseline" or classical_model
with stage("evaluate", f"{sm.wildcards.set}/{sm.wildcards.method}", sm.log[0]) as log:
    device = pick_device(sm.params.device, log.info)
    evaluate.evaluate_set(
        sm.input.sheet, "baseline" if baseline else "unet", sm.output.metrics, sm.output.overlays,
        weights=None if baseline else sm.input.weights[0], device=str(device), tta=bool(sm.params.tta), log=log.info,
        baseline_params=classical.params_from_cfg(model_cfg) if classical_model else None,
    )
