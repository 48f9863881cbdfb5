import numpy as np
from conftest import CMU, NDPI

from wsiseg.slide import open_slide
from wsiseg.tissue import detect_tissue, otsu_threshold


def test_otsu_splits_bimodal_sample():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.2, 0.03, 5000), rng.normal(0.7, 0.03, 5000)]).clip(0, 1)
    assert 0.3 < otsu_threshold(v) < 0.6


def test_he_slide_tissue_fraction_and_white_glass():
    with open_slide(str(CMU)) as s:
        thumb, ds = s.thumbnail(8.0)
    mask, method = detect_tissue(thumb, ds * 0.499)
    assert method == "saturation"
    assert 0.25 < mask.mean() < 0.6  # CMU-1 small region: a tissue strip on glass
    glass = thumb.min(axis=-1) > 235
    assert (mask & glass).sum() < 0.05 * glass.sum()  # glass is not tissue


def test_blank_glass_has_no_tissue():
    glass = np.full((200, 300, 3), 243, np.uint8)
    mask, _ = detect_tissue(glass, 4.0)
    assert not mask.any()


def test_fluorescence_uses_brightness():
    with open_slide(str(NDPI)) as s:
        thumb, ds = s.thumbnail(16 / 0.228)
    mask, method = detect_tissue(thumb, ds * s.mpp)
    assert method == "brightness"
    bright = thumb.max(axis=-1)
    assert bright[mask].mean() > 2 * bright[~mask].mean()


def test_method_all_keeps_everything():
    mask, method = detect_tissue(np.zeros((5, 7, 3), np.uint8), 1.0, method="all")
    assert method == "all" and mask.all()
