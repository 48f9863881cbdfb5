"""Where do a labeled set's nucleus outlines sit relative to the haematoxylin edge?

For each image: the mean haematoxylin optical density (colour deconvolution) as a
function of the signed distance to the annotated outline (µm; positive inside a
nucleus), and the distance at which it crosses half-way between the level inside
(>= 1.5 µm in) and outside (>= 1.5 µm out). A crossing near 0 means the outlines
follow the stain's edge; a positive one (the stain reaches half-way only inside
the outline) means they are drawn outside it (generous), a negative one inside
it (tight).

Run on training data only (never on a held-out test set):

    python models/annotation_edge.py config/labeled/miccai2015-train.tsv
"""

import os
import sys

import numpy as np
from scipy import ndimage as ndi

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

from skimage.color import rgb2hed  # noqa: E402

from wsiseg import labels  # noqa: E402

STEP_UM = 0.25


def profile(rgb: np.ndarray, ids: np.ndarray, mpp: float, reach_um: float = 3.0):
    h = rgb2hed(rgb)[..., 0]
    fg = ids > 0
    signed = np.where(fg, ndi.distance_transform_edt(fg) - 0.5, -(ndi.distance_transform_edt(~fg) - 0.5)) * mpp
    edges = np.arange(-reach_um, reach_um + STEP_UM / 2, STEP_UM)
    idx = np.digitize(signed, edges) - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    total = np.bincount(idx[ok], weights=h[ok], minlength=len(edges) - 1)
    count = np.bincount(idx[ok], minlength=len(edges) - 1)
    centres = (edges[:-1] + edges[1:]) / 2
    keep = count > 0
    return centres[keep], total[keep] / count[keep]


def crossing(centres, prof):
    inside, outside = prof[centres >= 1.5].mean(), prof[centres <= -1.5].mean()
    half = (inside + outside) / 2
    above = np.nonzero((prof[:-1] < half) & (prof[1:] >= half))[0]
    if len(above) == 0:
        return float("nan"), inside, outside
    i = above[-1]
    x = centres[i] + (half - prof[i]) / (prof[i + 1] - prof[i]) * (centres[i + 1] - centres[i])
    return float(x), inside, outside


def main():
    sheet = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "config", "labeled", "miccai2015-train.tsv")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"{'image':>10} {'mpp':>5} {'H inside':>9} {'H outside':>9} {'half-max at (µm)':>17}")
    rows = []
    for _, row in labels.read_sheet(sheet).iterrows():
        s = labels.load_sample(row, 0.5, keep_native=True)
        c, p = profile(s.native_image, s.native_instances, s.mpp)
        x, hin, hout = crossing(c, p)
        rows.append((s.mpp, x))
        print(f"{s.name:>10} {s.mpp:>5.2f} {hin:>9.3f} {hout:>9.3f} {x:>17.2f}")
    for mpp in sorted({m for m, _ in rows}):
        xs = [x for m, x in rows if m == mpp and np.isfinite(x)]
        print(
            f"mean at {mpp} µm/px: {np.mean(xs):+.2f} µm over {len(xs)} images "
            "(positive: outlines drawn outside the stain edge)"
        )


if __name__ == "__main__":
    main()
