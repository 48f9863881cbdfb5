"""Morphometrics of single objects against scikit-image (regionprops, convex_hull_image,
perimeter, rgb2hed) and against hand computations: the conventions users rely on."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from skimage.color import rgb2hed
from skimage.measure import perimeter, regionprops
from skimage.morphology import convex_hull_image

from wsiseg import morphometrics as mm


def measure_one(image: np.ndarray) -> dict:
    """The module's measurements of one binary object, computed as count_objects does."""
    ys, xs = np.nonzero(image)
    obj = np.zeros(len(ys), np.int64)
    o, row, xl, xr = mm.row_extremes(obj, ys, xs)
    left, right = (mm.chain(*p, is_left) for p, is_left in zip(mm.side_points(o, row, xl, xr), (True, False)))
    _, convex = mm.hull_pixels(left, right)
    _, wc = mm.perimeter_weights(np.pad(image.astype(np.uint8), 2), 2)
    per = sum(np.count_nonzero(wc == c) * w for c, w in zip((1, 2, 3), mm.PERIMETER_WEIGHTS))
    x, y = xs.astype(float), ys.astype(float)
    major, minor, ecc, orient = mm.ellipse([len(x)], [x @ x], [y @ y], [x @ y], [x.sum()], [y.sum()])
    return dict(convex=convex[0], perimeter=per, major=major[0], minor=minor[0], ecc=ecc[0], orient=orient[0])


def test_random_shapes_match_scikit_image():
    """Blobs, lines, rings and speckle: convex hull pixels, perimeter and ellipse equal
    regionprops' on the same object."""
    rng = np.random.default_rng(0)
    n = 0
    for _ in range(300):
        h, w = rng.integers(1, 25, 2)
        a = rng.random((h, w)) < rng.uniform(0.2, 1.0)
        if not a.any():
            continue
        from scipy import ndimage as ndi

        lab, _ = ndi.label(a, structure=np.ones((3, 3)))
        a = lab == np.bincount(lab.ravel())[1:].argmax() + 1  # its largest 8-connected object
        (r,) = regionprops(a.astype(np.uint8))
        got = measure_one(a)
        assert got["convex"] == r.area_convex == convex_hull_image(a).sum()
        assert got["perimeter"] == pytest.approx(perimeter(a, 4), rel=1e-12, abs=1e-12)
        assert got["major"] == pytest.approx(r.axis_major_length, rel=1e-9, abs=1e-6)
        assert got["minor"] == pytest.approx(r.axis_minor_length, rel=1e-9, abs=1e-6)
        assert got["ecc"] == pytest.approx(r.eccentricity, rel=1e-9, abs=1e-6)
        n += 1
    assert n > 250


@pytest.mark.parametrize(
    "shape,orientation",
    [
        ("horizontal", 0.0),  # along x
        ("vertical", 90.0),
        ("rising", 45.0),  # '/' as the image is shown (y down): counter-clockwise from x
        ("falling", -45.0),  # '\'
        ("disc", 45.0),  # isotropic: regionprops' rule for equal variances
    ],
)
def test_orientation_convention(shape, orientation):
    a = np.zeros((21, 21), bool)
    i = np.arange(3, 18)
    if shape == "horizontal":
        a[10, 3:18] = a[11, 5:16] = True
    elif shape == "vertical":
        a[3:18, 10] = a[5:16, 11] = True
    elif shape in ("rising", "falling"):
        a[i, i] = a[i + 1, i] = a[i, i + 1] = True  # a band along the diagonal, symmetric about it
        if shape == "rising":
            a = a[::-1]
    else:
        yy, xx = np.mgrid[:21, :21]
        a = (yy - 10) ** 2 + (xx - 10) ** 2 <= 36
    got = measure_one(a)
    assert got["orient"] == pytest.approx(orientation, abs=1e-9)
    (r,) = regionprops(a.astype(np.uint8))
    theta = math.degrees(r.orientation)  # from the row axis
    assert got["orient"] == pytest.approx(theta - 90 if theta > 0 else theta + 90, abs=1e-9)


def test_a_line_by_hand():
    """n pixels in a row: variance (n² - 1) / 12 along it, 0 across: major axis
    4 sqrt((n² - 1) / 12), minor 0, eccentricity 1; its hull is its n pixels."""
    a = np.zeros((3, 12), bool)
    a[1, 1:11] = True
    got = measure_one(a)
    assert got["major"] == pytest.approx(4 * math.sqrt(99 / 12))
    assert got["minor"] == 0 and got["ecc"] == 1 and got["convex"] == 10 and got["orient"] == 0


def test_stain_od_by_hand():
    """Optical density of a pixel, per channel -log10(I / 255), deconvolved by the
    Ruifrok-Johnston H, E, DAB vectors (the rows of rgb_from_hed), negative set to 0;
    equal to 6 x scikit-image's rgb2hed, the classical model's channel."""
    rgb = np.array([[85, 55, 140], [232, 160, 205], [255, 255, 255], [0, 0, 0], [120, 60, 30]], np.float64)
    vectors = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])  # H, E, DAB
    od = -np.log10(np.maximum(rgb / 255, 1e-6))
    want = np.maximum(od @ np.linalg.inv(vectors), 0)
    h, e = mm.stain_od(rgb)
    assert np.allclose(h, want[:, 0], rtol=1e-12) and np.allclose(e, want[:, 1], rtol=1e-12)
    sk = 6 * rgb2hed(rgb[None] / 255)[0]
    assert np.allclose(h, sk[:, 0], rtol=1e-9, atol=1e-12) and np.allclose(e, sk[:, 1], rtol=1e-9, atol=1e-12)
    assert h[0] == pytest.approx(0.6954, abs=1e-4) and e[0] < h[0]  # the synthetic slide's haematoxylin
    assert h[2] == e[2] == 0  # glass


def test_neighbours_against_brute_force():
    """Counts within the radius (inclusive) and the nearest other point: points on a grid
    (distances exactly at the radius), duplicates, and random ones; chunked queries."""
    rng = np.random.default_rng(1)
    g = np.arange(0, 100, 25.0)
    gx, gy = np.meshgrid(g, g)
    x = np.concatenate([gx.ravel(), rng.uniform(0, 300, 500), [7.0, 7.0]])
    y = np.concatenate([gy.ravel(), rng.uniform(0, 300, 500), [9.0, 9.0]])
    d = cdist(np.c_[x, y], np.c_[x, y])
    np.fill_diagonal(d, np.inf)
    count, nearest = mm.neighbours(x, y, 25.0, chunk=37)
    assert (count == (d <= 25.0).sum(1)).all() and np.array_equal(nearest, d.min(1))
    assert count[:16].min() >= 2 and nearest[-1] == 0  # the grid's 25 µm steps count; duplicates
    one, none = mm.neighbours([1.0], [2.0], 25.0), mm.neighbours([], [], 25.0)
    assert one[0].tolist() == [0] and np.isnan(one[1]).all() and len(none[0]) == len(none[1]) == 0
