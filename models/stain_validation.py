"""Does test-time stain normalisation help? ``model.stain_normalise: reinhard`` on the validation tiles.

Each validation tile (the sheet's ``split`` = val rows) is predicted four times by the
model, without flip/rotation averaging and with its stored post-processing, exactly as
``snakemake evaluate`` predicts it (:meth:`wsiseg.models.ModelSpec.predict_instances`):
with ``model.stain_normalise: none``; with ``reinhard`` to the *pooled* reference (the
tissue's CIE-Lab mean and std over all pixels of the sheet's other rows at the model's
mpp, :func:`wsiseg.stain.reference_from_sheet`, what ``python -m wsiseg.stain`` prints),
unbounded, as the first candidate; and with ``reinhard`` to the *within-tile* reference
(the mean of each training tile's own mean and std, ``--within-tile``), each channel's
stretch clamped to [1/2, 2] (``model.stain_max_scale`` 2); and with ``reinhard`` to the pooled
reference's mean only, each tile's spread kept (``model.stain_max_scale`` 1, the third
candidate). A tile stands for a slide: its
own tissue statistics set its transform (the per-channel factors are printed). All are
scored against the annotations at the tile's own resolution; per-tile and mean Dice, AJI
and predicted / annotated nucleus area are printed.

Run on a sheet with a validation split only (never on a held-out test set):

    python models/stain_validation.py config/labeled/nuclei-train.tsv models/nuclei-unet.pt
"""

import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from wsiseg import labels as L  # noqa: E402
from wsiseg.metrics import all_metrics  # noqa: E402
from wsiseg.models import load_model  # noqa: E402
from wsiseg.stain import measure_windows, reference_from_sheet, scales  # noqa: E402

MAX_SCALE = 2.0  # the within-tile variant's bound, fixed by its selection rule (models/README.md)


def main(sheet: str, weights: str) -> None:
    base = {"weights": weights, "name": "model"}
    off = load_model(base, geometry=False)
    variants = {"none": off}
    runs = (("pooled", False, math.inf), ("within-tile", True, MAX_SCALE), ("pooled, shift only", False, 1.0))
    for name, within, bound in runs:
        ref = reference_from_sheet(sheet, off.mpp, within_tile=within)
        cfg = dict(base, stain_normalise="reinhard", stain_reference=ref, stain_max_scale=bound)
        variants[name] = load_model(cfg, geometry=False)
        print(f"reinhard, {name} reference (training rows' tissue, CIE-Lab at {off.mpp} µm/px), bound {bound:g}: {ref}")
    val = [s for s in L.load_set(sheet, off.mpp, keep_native=True) if s.split == "val"]
    if not val:
        sys.exit(f"{sheet} has no split=val rows: this script runs on validation tiles only")
    print(f"{weights}: post-processing {off.postprocess}, no TTA, {len(val)} validation tiles")
    res = {}
    for name, spec in variants.items():
        rows, pred_px, gt_px = [], 0, 0
        for s in val:
            pred = spec.predict_instances(s, tta=False)
            rows.append(all_metrics(s.native_instances, pred))
            pred_px += int((pred > 0).sum())
            gt_px += int((s.native_instances > 0).sum())
            line = f"  {name:>18} {s.name:<28} Dice {rows[-1]['dice']:.3f} AJI {rows[-1]['aji']:.3f}"
            if spec.stain:  # the factors by which this tile's transform stretches L*, a*, b*
                src, ref = measure_windows([s.image]), spec.stain["reference"]
                line += f" scale {_fmt(scales(src, ref, spec.stain['max_scale']))} (unclamped {_fmt(scales(src, ref))})"
            print(line, flush=True)
        res[name] = dict(
            dice=float(np.mean([r["dice"] for r in rows])),
            aji=float(np.mean([r["aji"] for r in rows])),
            area=pred_px / max(gt_px, 1),
        )
    print("\n| stain_normalise | reference | bound | Dice | AJI | predicted / annotated area |")
    print("|---|---|---|---|---|---|")
    for name, m in res.items():
        how = "| none | | |" if name == "none" else f"| reinhard | {name} | {variants[name].stain['max_scale']:g} |"
        print(f"{how} {m['dice']:.3f} | {m['aji']:.3f} | {m['area']:.2f} |")
    print(f"\ncommand: python models/stain_validation.py {sheet} {weights}")


def _fmt(k) -> str:
    return " ".join(f"x{v:.2f}" for v in k)


if __name__ == "__main__":
    main(*sys.argv[1:])
