import numpy as np
from conftest import CMU, NDPI, needs_data

from wsiseg.slide import open_slide
from wsiseg.tissue import detect_tissue, otsu_threshold


def test_otsu_splits_bimodal_sample():
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0.2, 0.03, 5000), rng.normal(0.7, 0.03, 5000)]).clip(0, 1)
    assert 0.3 < otsu_threshold(v) < 0.6


@needs_data
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


@needs_data
def test_fluorescence_uses_brightness():
    with open_slide(str(NDPI)) as s:
        thumb, ds = s.thumbnail(16 / 0.228)
    mask, method = detect_tissue(thumb, ds * s.mpp)
    assert method == "brightness"
    bright = thumb.max(axis=-1)
    assert bright[mask].mean() > 2 * bright[~mask].mean()
    assert mask.mean() > 0.6  # the section fills most of the frame, sparse nuclei included
    assert not mask[:, :3].all()  # the dark margin at the slide's edge is not tissue


def test_field_of_bright_nuclei_is_one_piece_of_tissue():
    rng = np.random.default_rng(0)
    img = np.zeros((300, 300, 3), np.uint8)
    ys, xs = rng.integers(60, 240, 400), rng.integers(60, 240, 400)
    img[ys, xs, 2] = 200  # isolated nuclei (1 px at 4 µm/px) on black
    mask, method = detect_tissue(img, 4.0)
    lab, n = __import__("scipy.ndimage", fromlist=["label"]).label(mask)
    assert method == "brightness" and n == 1
    assert mask[150, 150] and not mask[10, 10] and not mask[290, 290]


def test_round_tissue_stays_round():
    """The closing uses a disk: no diamond-shaped artefacts at the tissue edge."""
    yy, xx = np.mgrid[0:400, 0:400]
    disk = (yy - 200) ** 2 + (xx - 200) ** 2 <= 120**2
    img = np.full((400, 400, 3), 243, np.uint8)
    img[disk] = (200, 120, 170)
    mask, _ = detect_tissue(img, 4.0)
    iou = (mask & disk).sum() / (mask | disk).sum()
    assert iou > 0.97


def test_method_all_keeps_everything():
    mask, method = detect_tissue(np.zeros((5, 7, 3), np.uint8), 1.0, method="all")
    assert method == "all" and mask.all()
