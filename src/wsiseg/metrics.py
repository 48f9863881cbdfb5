"""Segmentation metrics of a labeled image, and the evaluate target's tables (no torch).

Pixel metrics compare the object (foreground) masks; instance metrics compare the
object instances:

* AJI, aggregated Jaccard index (Kumar et al. 2017): each ground-truth object is
  paired with the predicted object of highest IoU; intersections and unions of
  the pairs are summed, and the areas of predicted objects never paired are added
  to the union.
* object F1 at IoU 0.5: a predicted object is a true positive when its IoU with a
  ground-truth object exceeds 0.5 (such a match is necessarily unique).

:func:`write_metrics` writes one set's per-image table (rule 'evaluate_set');
:func:`compare` puts the mean rows side by side (rule 'evaluate').
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd


def pixel_metrics(gt_fg: np.ndarray, pred_fg: np.ndarray) -> dict:
    gt_fg, pred_fg = np.asarray(gt_fg, bool), np.asarray(pred_fg, bool)
    tp = int(np.sum(gt_fg & pred_fg))
    fp = int(np.sum(~gt_fg & pred_fg))
    fn = int(np.sum(gt_fg & ~pred_fg))
    tn = int(gt_fg.size - tp - fp - fn)

    def div(a, b):
        return a / b if b else float("nan")

    return dict(
        pixel_accuracy=div(tp + tn, gt_fg.size),
        precision=div(tp, tp + fp),
        recall=div(tp, tp + fn),
        dice=div(2 * tp, 2 * tp + fp + fn),
        iou=div(tp, tp + fp + fn),
    )


def _overlaps(gt: np.ndarray, pred: np.ndarray):
    """Areas of gt and pred objects and the intersection table (sparse, as arrays)."""
    gt = np.asarray(gt, np.int64)
    pred = np.asarray(pred, np.int64)
    ng, npred = int(gt.max()), int(pred.max())
    ga = np.bincount(gt.ravel(), minlength=ng + 1)
    pa = np.bincount(pred.ravel(), minlength=npred + 1)
    both = (gt > 0) & (pred > 0)
    pair = gt[both] * (npred + 1) + pred[both]
    keys, inter = np.unique(pair, return_counts=True)
    return ga, pa, keys // (npred + 1), keys % (npred + 1), inter


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard index of two instance label images (0 = background)."""
    ga, pa, gi, pi, inter = _overlaps(gt, pred)
    ng = len(ga) - 1
    if ng == 0:
        return float("nan")
    union = ga[gi] + pa[pi] - inter
    iou = inter / union
    # best predicted partner of each gt object (highest IoU)
    order = np.lexsort((-iou, gi))
    first = np.ones(len(order), bool)
    first[1:] = gi[order][1:] != gi[order][:-1]
    best = order[first]
    c = int(inter[best].sum())
    u = int(union[best].sum())
    matched_gt = np.zeros(ng + 1, bool)
    matched_gt[gi[best]] = True
    u += int(ga[1:][~matched_gt[1:]].sum())  # gt objects with no overlap at all
    used = np.zeros(len(pa), bool)
    used[pi[best]] = True
    u += int(pa[1:][~used[1:]].sum())
    return c / u if u else float("nan")


def object_f1(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> dict:
    ga, pa, gi, pi, inter = _overlaps(gt, pred)
    ng, npred = len(ga) - 1, len(pa) - 1
    iou = inter / (ga[gi] + pa[pi] - inter) if len(inter) else np.zeros(0)
    tp = int(np.sum(iou > iou_threshold))
    prec = tp / npred if npred else float("nan")
    rec = tp / ng if ng else float("nan")
    f1 = 2 * tp / (ng + npred) if ng + npred else float("nan")
    return dict(object_tp=tp, object_precision=prec, object_recall=rec, object_f1=f1, n_true=ng, n_pred=npred)


def all_metrics(gt: np.ndarray, pred: np.ndarray) -> dict:
    m = pixel_metrics(gt > 0, pred > 0)
    m["aji"] = aji(gt, pred)
    m.update(object_f1(gt, pred))
    return m


def write_metrics(rows: list, out_csv: str, log=print) -> pd.DataFrame:
    """Per-image metric rows plus a ``mean`` row, to ``out_csv`` (the evaluate target's format)."""
    df = pd.DataFrame(rows)
    mean = df.drop(columns=["image"]).mean(numeric_only=True)
    df = pd.concat([df, pd.DataFrame([{"image": "mean", **mean.to_dict()}])], ignore_index=True)
    tmp = f"{out_csv}.tmp"
    df.to_csv(tmp, index=False, float_format="%.4f")
    os.replace(tmp, out_csv)
    log(
        f"mean over {len(rows)} images: dice {mean['dice']:.4f} aji {mean['aji']:.4f} object_f1 {mean['object_f1']:.4f}"
    )
    return df


def compare(metric_csvs: list, out_csv: str, log=print) -> pd.DataFrame:
    """Mean rows of ``<set>/<method>/metrics.csv`` files side by side."""
    rows = []
    for p in metric_csvs:
        df = pd.read_csv(p)
        mean = df[df["image"] == "mean"].iloc[0].to_dict()
        method = os.path.basename(os.path.dirname(p))
        eval_set = os.path.basename(os.path.dirname(os.path.dirname(p)))
        keep = [
            "dice",
            "aji",
            "object_f1",
            "pixel_accuracy",
            "precision",
            "recall",
            "iou",
            "object_precision",
            "object_recall",
        ]
        rows.append(
            dict(set=eval_set, method=method, images=int((df["image"] != "mean").sum()), **{k: mean[k] for k in keep})
        )
    out = pd.DataFrame(rows)
    out.to_csv(out_csv, index=False, float_format="%.4f")
    log("\n" + out.to_string(index=False))
    return out
