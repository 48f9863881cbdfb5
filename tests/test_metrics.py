"""Evaluation metrics against hand-computed cases; instance post-processing."""

import numpy as np
import pytest
from conftest import DATA, REPO, needs_data
from scipy import ndimage as ndi

from wsiseg import labels as L
from wsiseg.evaluate import BASELINE, evaluate_set
from wsiseg.metrics import aji, all_metrics, object_f1, pixel_metrics
from wsiseg.postprocess import (
    InstanceParams,
    classical_instances,
    fill_small_holes,
    instances_from_probs,
    separated_mask,
)


def boxes(shape, *spec):
    out = np.zeros(shape, np.int32)
    for k, (y0, y1, x0, x1) in enumerate(spec, start=1):
        out[y0:y1, x0:x1] = k
    return out


def test_pixel_metrics_by_hand():
    gt = np.zeros((10, 10), bool)
    gt[0:4, 0:5] = True  # 20 px
    pred = np.zeros((10, 10), bool)
    pred[2:6, 0:5] = True  # 20 px, 10 of them shared
    m = pixel_metrics(gt, pred)
    # tp 10, fp 10, fn 10, tn 70
    assert m["pixel_accuracy"] == pytest.approx(0.8)
    assert m["precision"] == m["recall"] == pytest.approx(0.5)
    assert m["dice"] == pytest.approx(0.5)
    assert m["iou"] == pytest.approx(10 / 30)


def test_aji_and_object_f1_by_hand():
    # gt: A (4x4=16 px) and B (4x4=16 px)
    gt = boxes((12, 12), (0, 4, 0, 4), (6, 10, 6, 10))
    # pred: P1 covers A exactly; P2 covers half of B plus 8 px outside; P3 is a false positive (4 px)
    pred = boxes((12, 12), (0, 4, 0, 4), (8, 12, 6, 10), (0, 2, 10, 12))
    # A-P1: I 16, U 16.  B-P2: I 8, U 16 + 16 - 8 = 24.  P3 unmatched adds 4.
    assert aji(gt, pred) == pytest.approx((16 + 8) / (16 + 24 + 4))
    f = object_f1(gt, pred)
    # IoU(A,P1)=1 > 0.5; IoU(B,P2)=1/3 is not: 1 TP of 2 true and 3 predicted
    assert (f["object_tp"], f["n_true"], f["n_pred"]) == (1, 2, 3)
    assert f["object_precision"] == pytest.approx(1 / 3)
    assert f["object_recall"] == pytest.approx(1 / 2)
    assert f["object_f1"] == pytest.approx(2 * 1 / (2 + 3))


def test_aji_penalises_merging_and_missing():
    gt = boxes((10, 20), (2, 6, 2, 8), (2, 6, 8, 14))  # two touching objects, 24 px each
    merged = (gt > 0).astype(np.int32)  # one predicted blob over both
    # both gt objects pick the merged blob (IoU 0.5 each): C = 24 + 24, U = 48 + 48
    assert aji(gt, merged) == pytest.approx(0.5)
    assert aji(gt, gt) == 1.0
    assert aji(gt, np.zeros_like(gt)) == 0.0  # nothing found: C = 0, U = 48
    m = all_metrics(gt, merged)
    assert m["dice"] == 1.0 and m["object_tp"] == 0  # pixel-perfect, yet no object right


def test_separated_mask_keeps_touching_objects_apart():
    ids = boxes((12, 20), (2, 10, 2, 10), (2, 10, 10, 18))
    ids[10, 10] = 2  # diagonal contact too
    m = separated_mask(ids)
    _, n = ndi.label(m, structure=np.ones((3, 3)))
    assert n == 2
    assert m[5, 5] == 1 and m[5, 14] == 1 and m[5, 9] == 0 and m[5, 10] == 0


def test_separated_mask_and_remove_small_equal_their_definitions():
    """The vectorised separated_mask (4 directions, both ends of each pair; ``crop`` from a 1-px
    surround) and remove_small (one lookup) give exactly what their definitions give:
    8-neighbour clashes over the whole zero-padded image, and removal then renumbering by
    wsiseg.labels.relabel."""
    from wsiseg.postprocess import remove_small

    def clash_by_definition(ids):
        pad, (h, w) = np.pad(ids, 1), ids.shape
        clash = np.zeros(ids.shape, bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dy or dx:
                    n = pad[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
                    clash |= (n > 0) & (n != ids)
        return ((ids > 0) & ~clash).astype(np.uint8)

    rng = np.random.default_rng(1)
    for it in range(200):
        ids = rng.integers(0, rng.integers(1, 30), tuple(rng.integers(1, 30, 2))).astype(np.int32)
        if it % 2:  # objects of several px
            ids = np.repeat(np.repeat(ids, 3, 0), 3, 1)
        ref = clash_by_definition(ids)
        assert np.array_equal(separated_mask(ids), ref)
        y0, x0 = rng.integers(0, ids.shape[0]), rng.integers(0, ids.shape[1])
        y1, x1 = rng.integers(y0, ids.shape[0] + 1), rng.integers(x0, ids.shape[1] + 1)
        assert np.array_equal(separated_mask(ids, (slice(y0, y1), slice(x0, x1))), ref[y0:y1, x0:x1])
        for min_px in (2, 5, 40):
            sizes = np.bincount(ids.ravel())
            want = np.where((sizes[ids] >= min_px) & (ids > 0), ids, 0)
            got = remove_small(ids, min_px)
            assert got.dtype == np.int32 and np.array_equal(got, L.relabel(want))


def test_instances_from_probs_splits_at_the_boundary():
    gt = boxes((30, 40), (5, 25, 5, 20), (5, 25, 20, 35))
    t = L.three_class_target(gt)
    prob = np.stack([(t == k).astype(np.float32) for k in range(3)]) * 0.9 + 0.1 / 3
    ids = instances_from_probs(prob, mpp=0.5, params=InstanceParams())
    assert ids.max() == 2
    assert aji(gt, ids) > 0.95  # the watershed gives the boundary pixels back to their objects


@needs_data
def test_classical_baseline_finds_nuclei_on_a_real_tile():
    s = L.load_set(str(REPO / "config/labeled/miccai2015-train.tsv"), 0.5)[0]  # image01, 20x
    ids = classical_instances(s.image, 0.5)
    m = all_metrics(s.instances, ids)
    n_true = s.instances.max()
    assert 0.5 * n_true < ids.max() < 1.5 * n_true
    assert m["dice"] > 0.6 and m["aji"] > 0.3


def test_small_holes_are_filled_but_not_a_ring_of_nuclei():
    """A hole inside a nucleus is filled; the lumen enclosed by a ring of touching nuclei is not."""
    yy, xx = np.mgrid[:200, :200]
    r = np.hypot(yy - 100, xx - 100)
    ring = (r > 40) & (r < 52)  # a ring of nuclei around a gland's lumen (0.5 µm/px: 80 µm wide)
    nucleus = (np.hypot(yy - 20, xx - 20) < 8) & ~(np.hypot(yy - 20, xx - 20) < 2)  # a vesicular nucleus
    out = fill_small_holes(ring | nucleus, 0.5)
    assert out[20, 20] and not out[100, 100]
    assert out.sum() == (ring | nucleus).sum() + (np.hypot(yy - 20, xx - 20) < 2).sum()
    # the U-Net post-processing keeps the lumen empty too
    prob = np.stack([1.0 - ring, ring * 1.0, np.zeros_like(r)]).astype(np.float32)
    assert instances_from_probs(prob, 0.5)[100, 100] == 0


@needs_data
def test_evaluate_scores_the_baseline_with_given_settings(tmp_path):
    sheet = tmp_path / "one.tsv"
    rows = L.read_sheet(str(REPO / "config/labeled/miccai2015-train.tsv")).iloc[:1]  # image01, 20x
    rows.to_csv(sheet, sep="\t", index=False)
    default = evaluate_set(str(sheet), BASELINE, str(tmp_path / "a.csv"))
    strict = evaluate_set(str(sheet), dict(BASELINE, classical=dict(min_object_um2=60.0)), str(tmp_path / "b.csv"))
    assert default["dice"].iloc[0] > 0.6  # image01 row
    # dropping objects under 60 µm² removes pixels: recall falls, precision does not
    assert strict["recall"].iloc[0] < default["recall"].iloc[0]


@needs_data
def test_labeled_data_is_where_the_sheets_say():
    assert (DATA / "labeled" / "monuseg2018-testset").is_dir()
    test = L.read_sheet(str(REPO / "config/labeled/monuseg2018-test.tsv"))
    assert len(test) == 14 and all(p.endswith(".xml") for p in test["labels"])
