"""Evaluate a model (or the classical baseline) on a labeled set (rule 'evaluate_set').

Each image is predicted as :meth:`wsiseg.models.ModelSpec.predict_instances` does it (the
U-Net at the model's mpp, its class probabilities resized to the image's own resolution
and post-processed there), so the metrics (:mod:`wsiseg.metrics`: Dice, IoU, AJI, object
F1) are computed against the annotations as drawn.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd

from . import labels as L
from .metrics import all_metrics, write_metrics


# ------------------------------------------------------------------ overlays
def overlay_png(path: str, image: np.ndarray, gt: np.ndarray, pred: np.ndarray) -> None:
    """Ground-truth outlines green, predicted outlines magenta (both: white)."""
    from PIL import Image

    out = image.copy()
    g = L.instance_boundaries(gt)
    p = L.instance_boundaries(pred)
    out[g & ~p] = (0, 200, 0)
    out[p & ~g] = (230, 0, 230)
    out[g & p] = (255, 255, 255)
    Image.fromarray(out).save(path)


# ------------------------------------------------------------------ runner
BASELINE = {"format": "classical", "name": "classical-baseline", "mpp": 0.5}  # the classical model's defaults


def evaluate_set(
    sheet: str,
    model_cfg: dict,
    out_csv: str,
    overlay_dir: str | None = None,
    device: str = "cpu",
    tta: bool = True,
    log=print,
) -> pd.DataFrame:
    """Per-image metrics CSV (plus a ``mean`` row) of the model of ``model_cfg`` (a ``model:``
    block; :data:`BASELINE` is the classical baseline) on a labeled-set sheet.

    Each image is predicted as :meth:`wsiseg.models.ModelSpec.predict_instances` does (the
    U-Net at its mpp, resized back; the classical model at the image's own resolution with
    Otsu's threshold of the image) and scored against its annotations as drawn.
    """
    from .models import load_model
    from .segment import network_heap

    if overlay_dir:
        os.makedirs(overlay_dir, exist_ok=True)
    if str(device) == "cpu":
        network_heap()  # the network's activations from the heap, not fresh page-faulted mappings
    spec = load_model(model_cfg, device=device, geometry=False)
    log(spec.describe())
    rows = []
    for s in L.load_set(sheet, spec.evaluate_mpp, keep_native=True):
        t0 = time.monotonic()
        img, gt = s.native_image, s.native_instances
        pred = spec.predict_instances(s, tta=tta, device=device)
        m = dict(image=s.name, mpp=s.mpp, **all_metrics(gt, pred), seconds=round(time.monotonic() - t0, 2))
        rows.append(m)
        log(f"{s.name}: dice {m['dice']:.3f} aji {m['aji']:.3f} object_f1 {m['object_f1']:.3f}")
        if overlay_dir:
            overlay_png(os.path.join(overlay_dir, f"{s.name}.png"), img, gt, pred)
    return write_metrics(rows, out_csv, log)
