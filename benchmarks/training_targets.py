"""Time to build the training target of one crop: the three-class target and the paper's
border weight map (train.target: weight_map), on the MICCAI 2015 training tiles at the
model's resolution.

The weight map is computed with each object's distance map restricted to its bounding box
grown by 6 sigma (wsiseg.labels.border_weight_map); "whole image" is the formula computed
as written, one full-image distance transform per object, for comparison.

    python benchmarks/training_targets.py [--sheet config/labeled/miccai2015-train.tsv] [--crop 256]
"""

import argparse
import os
import sys
import time

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from wsiseg import labels as L  # noqa: E402


def whole_image_weight_map(ids, w0=10.0, sigma=5.0):
    fg = ids > 0
    w = np.where(fg, 0.5 / fg.mean(), 0.5 / (1 - fg.mean())).astype(np.float32)
    d1 = np.full(ids.shape, np.inf, np.float32)
    d2 = np.full(ids.shape, np.inf, np.float32)
    for k in np.unique(ids[fg]):
        d = ndi.distance_transform_edt(ids != k).astype(np.float32)
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    return w + np.where(fg, 0.0, w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)))


def timed(fn, *a, repeat=3):
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*a)
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sheet", default="config/labeled/miccai2015-train.tsv")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--crop", type=int, default=256, help="crop side in px (the train.crop setting)")
    args = ap.parse_args()
    print(f"command: python benchmarks/training_targets.py --sheet {args.sheet} --crop {args.crop}")
    print(
        f"{'image':>8} {'objects':>7} {'three_class ms':>14} {'weight map ms':>13} {'whole image ms':>14} "
        f"{'max |diff|':>10}"
    )
    tot = np.zeros(3)
    for s in L.load_set(args.sheet, args.mpp):
        ids = s.instances[: args.crop, : args.crop]
        n = len(np.unique(ids[ids > 0]))
        t3, _ = timed(L.three_class_target, ids)
        tw, w = timed(L.border_weight_map, ids)
        tr, ref = timed(whole_image_weight_map, ids, repeat=1)
        tot += (t3, tw, tr)
        print(
            f"{s.name:>8} {n:>7} {t3 * 1e3:>14.1f} {tw * 1e3:>13.1f} {tr * 1e3:>14.1f} {np.abs(w - ref).max():>10.1e}"
        )
    print(f"{'total':>8} {'':>7} {tot[0] * 1e3:>14.1f} {tot[1] * 1e3:>13.1f} {tot[2] * 1e3:>14.1f}")


if __name__ == "__main__":
    main()
