"""Would test-time stain normalisation help? Reinhard's colour transfer on the validation tiles.

Each validation tile (the sheet's ``split`` = val rows) is predicted twice by a
checkpoint, without flip/rotation averaging and with its stored post-processing:
as it is, and after Reinhard et al.'s (2001) colour transfer, which gives the tile's
tissue pixels (CIE-Lab L* < 88, i.e. not the white background) the per-channel
Lab mean and standard deviation of the training tiles' tissue pixels (the sheet's
other rows, at the model's mpp). Both are scored as the train target scores
``validation.csv`` (each tile at its own resolution), and the mean Dice, AJI and
predicted / annotated area are printed.

The statistics are each tile's own: a tile stands for a whole slide here, which is
not how a slide would be normalised in the workflow (one transform per slide, from
statistics of its tissue at the model's mpp, so tiles stay seam-free), and nuclei-
dense tiles have other statistics than a slide's tissue as a whole.

Run on a sheet with a validation split only (never on a held-out test set):

    python models/stain_validation.py config/labeled/nuclei-train.tsv models/nuclei-unet.pt
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from skimage.color import lab2rgb, rgb2lab  # noqa: E402

from wsiseg import labels as L  # noqa: E402
from wsiseg.metrics import all_metrics  # noqa: E402
from wsiseg.models import load_model  # noqa: E402
from wsiseg.postprocess import InstanceParams, instances_from_probs  # noqa: E402
from wsiseg.predict import predict_probs, resize_probs  # noqa: E402

TISSUE_L = 88.0  # Lab lightness below which a pixel is tissue, not background


def tissue_lab(rgb: np.ndarray) -> np.ndarray:
    lab = rgb2lab(rgb).reshape(-1, 3)
    return lab[lab[:, 0] < TISSUE_L]


def reinhard(rgb: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``rgb`` with its tissue's Lab mean and std moved to ``mean`` and ``std`` (uint8)."""
    px = tissue_lab(rgb)
    lab = (rgb2lab(rgb) - px.mean(0)) / px.std(0) * std + mean
    return (np.clip(lab2rgb(lab), 0, 1) * 255 + 0.5).astype(np.uint8)


def main(sheet: str, weights: str) -> None:
    spec = load_model({"weights": weights, "name": "model"}, geometry=False)
    samples = L.load_set(sheet, spec.mpp, keep_native=True)
    val = [s for s in samples if s.split == "val"]
    if not val:
        sys.exit(f"{sheet} has no split=val rows: this script runs on validation tiles only")
    px = np.concatenate([tissue_lab(s.image) for s in samples if s.split != "val"])
    mean, std = px.mean(0), px.std(0)
    print(f"training tiles' tissue, Lab mean {mean.round(2)} std {std.round(2)}")
    params = InstanceParams(**(spec.postprocess or {}))
    print(f"{weights}, post-processing {params.as_dict()}, no TTA, {len(val)} validation tiles")
    print(f"{'input':>10} {'Dice':>6} {'AJI':>6} {'pred/annotated area':>20}")
    for name, norm in (("as is", False), ("Reinhard", True)):
        rows = []
        for s in val:
            img = reinhard(s.image, mean, std) if norm else s.image
            prob = resize_probs(predict_probs(spec.module, img, spec.align, tta=False), s.native_shape)
            rows.append(all_metrics(s.native_instances, instances_from_probs(prob, s.mpp, params)))
        m = {k: float(np.mean([r[k] for r in rows])) for k in ("dice", "aji", "precision", "recall")}
        print(f"{name:>10} {m['dice']:6.3f} {m['aji']:6.3f} {m['recall'] / m['precision']:20.2f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
