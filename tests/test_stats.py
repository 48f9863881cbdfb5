import math

import numpy as np
import pandas as pd
import pytest
from conftest import CMU, DATA, corrupt_slide, needs_data
from helpers import array_tiles, slide_stats
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.measure import regionprops

from wsiseg.geometry import Geometry, read_target
from wsiseg.labels import read_text_mask
from wsiseg.mask import write_ome_tiff
from wsiseg.objects import OBJECT_COLUMNS, count_objects, object_rows, shape_features, write_objects
from wsiseg.slide import open_slide
from wsiseg.stats import SlidePixels, measure
from wsiseg.store import TileStore


def test_objects_crossing_tile_borders_count_once():
    a = np.zeros((20, 20), np.uint8)
    a[3:17, 9:11] = 1  # crosses the vertical and horizontal borders at 10
    a[9, 3:17] = 1  # a cross: one object over four tiles
    a[0, 0] = 2
    a[9, 19] = 2  # class 2 pixel touching the class-1 cross: a separate object
    a[10, 18] = 0
    a[11, 17] = 2  # diagonal neighbours across no border ...
    a[10, 9] = 1
    res = count_objects(array_tiles(a, 10), 20, 3)
    assert len(res[1]["object_areas"]) == 1 and res[1]["object_areas"][0] == (a == 1).sum()
    lab, n = ndi.label(a == 2, structure=np.ones((3, 3)))
    assert len(res[2]["object_areas"]) == n


def test_diagonal_contact_across_a_tile_corner():
    a = np.zeros((8, 8), np.uint8)
    a[3, 3] = a[4, 4] = 1  # touch only diagonally, across the corner of four 4x4 tiles
    a[3, 4] = 0
    a[4, 3] = 0
    res = count_objects(array_tiles(a, 4), 8, 2)
    assert len(res[1]["object_areas"]) == 1


@pytest.mark.parametrize("tile", [7, 32, 1000])
def test_matches_whole_image_labelling(tile):
    rng = np.random.default_rng(tile)
    a = (ndi.zoom(rng.random((30, 40)), 5, order=1) > 0.6).astype(np.uint8)
    a[ndi.zoom(rng.random((30, 40)), 5, order=1) > 0.75] = 2
    res = count_objects(array_tiles(a, tile), a.shape[1], 3)
    for k in (1, 2):
        lab, n = ndi.label(a == k, structure=np.ones((3, 3)))
        assert sorted(res[k]["object_areas"].tolist()) == sorted(np.bincount(lab.ravel())[1:].tolist())
        assert res[k]["pixels"] == (a == k).sum()


def write_mask(path, a: np.ndarray, mpp=0.5, tile=128, store_tile=256) -> str:
    """``a`` as the stitch stage writes a mask: a pyramidal OME-TIFF of ``tile`` px tiles."""
    st = TileStore.create(str(path) + ".store", a.shape[0], a.shape[1], store_tile)
    for r in range(st.rows):
        for c in range(st.cols):
            st.write_chunk(r, c, a[r * store_tile : (r + 1) * store_tile, c * store_tile : (c + 1) * store_tile])
    write_ome_tiff(st, str(path), mpp=mpp, tile=tile)
    st.close()
    return str(path)


def test_slide_stats_areas_from_pixel_counts(tmp_path):
    a = np.zeros((600, 700), np.uint8)
    a[10:60, 10:110] = 1  # 5000 px
    a[500:600, 600:700] = 1  # 10000 px, at the bottom-right edge
    a[200:220, 200:230] = 2  # 600 px
    row = slide_stats(write_mask(tmp_path / "m.tif", a), ["background", "tumour", "stroma"], 0.5)
    assert row["tumour_count"] == 2 and row["stroma_count"] == 1
    assert row["tumour_area_mm2"] == pytest.approx(15000 * 0.25 / 1e6)
    assert row["tumour_mean_area_um2"] == pytest.approx(7500 * 0.25)
    assert row["tumour_median_area_um2"] == pytest.approx(7500 * 0.25)
    assert row["stroma_area_mm2"] == pytest.approx(600 * 0.25 / 1e6)
    # medians of the two rectangles' morphometrics, by hand: a w x h rectangle's border is 2 (w + h) - 4
    # pixels, each of weight 1 in skimage's perimeter (two border pixels beside it, none diagonal)
    perimeter = [2 * (w + h) - 4 for w, h in ((100, 50), (100, 100))]
    assert row["tumour_median_perimeter_um"] == pytest.approx(np.mean(perimeter) * 0.5)
    circ = [4 * math.pi * area / p**2 for area, p in zip((5000, 10000), perimeter)]
    assert row["tumour_median_circularity"] == pytest.approx(np.mean(circ))
    ecc = math.sqrt(1 - (50**2 - 1) / (100**2 - 1))  # variances (n² - 1) / 12 along each side
    assert row["tumour_median_eccentricity"] == pytest.approx(ecc / 2) and row["tumour_median_solidity"] == 1
    # no slide read: no colour; nearest neighbours of 3 objects (any class) from their centroids
    assert math.isnan(row["tumour_median_hematoxylin_od"])
    centroids = np.array([(60, 35), (650, 550), (215, 210)]) * 0.5  # µm
    d = np.linalg.norm(centroids[:, None] - centroids[None], axis=2) + np.diag([np.inf] * 3)
    assert row["tumour_median_nearest_neighbour_um"] == pytest.approx(np.median(d.min(1)[:2]))
    assert row["stroma_median_nearest_neighbour_um"] == pytest.approx(d.min(1)[2])


def matches_regionprops(res: dict, a: np.ndarray, k: int) -> int:
    """count_objects' measurements of class k equal regionprops' on a labelling of the whole
    mask ``a``; returns the number of objects."""
    lab, n = ndi.label(a == k, structure=np.ones((3, 3)))
    by_box = {
        (r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2], r.area, round(r.centroid[1], 6)): r for r in regionprops(lab)
    }
    o = res[k]["objects"]
    assert len(o["area"]) == n
    f = shape_features(o, 1.0)
    for i in range(n):
        r = by_box[(o["mx0"][i], o["my0"][i], o["mx1"][i], o["my1"][i], o["area"][i], round(o["cx"][i] - 0.5, 6))]
        assert f["perimeter_um"][i] == pytest.approx(r.perimeter, rel=1e-12, abs=1e-12)
        assert o["convex_area"][i] == r.area_convex and f["solidity"][i] == r.solidity
        assert f["major_axis_um"][i] == pytest.approx(r.axis_major_length, rel=1e-9, abs=1e-6)
        assert f["minor_axis_um"][i] == pytest.approx(r.axis_minor_length, rel=1e-9, abs=1e-6)
        assert f["eccentricity"][i] == pytest.approx(r.eccentricity, rel=1e-9, abs=1e-6)
        if r.perimeter > 0:
            assert f["circularity"][i] == pytest.approx(4 * math.pi * r.area / r.perimeter**2, rel=1e-12)
        ia, ib, _, ic = r.inertia_tensor.flat
        if abs(ia - ic) > 1e-9 * (ia + ic):  # orientation is defined: not an isotropic object
            theta = math.degrees(r.orientation)
            assert f["orientation_deg"][i] == pytest.approx(theta - 90 if theta > 0 else theta + 90, abs=1e-6)
    return n


@needs_data
@pytest.mark.parametrize("tile", [37, 128, 4096])
def test_morphometrics_equal_regionprops_across_tile_borders(tile):
    """Perimeter, convex hull (solidity), ellipse axes, eccentricity, orientation and
    circularity of the MICCAI image05 nuclei and a second class touching them, tiled,
    equal regionprops' on the whole mask: also for the objects that tile borders cut."""
    ids = read_text_mask(str(DATA / "labeled" / "miccai2015-nuclei-seg-training" / "image05_mask.txt"))
    a = (ids > 0).astype(np.uint8)
    a[(ids > 0) & (ids % 5 == 0)] = 2
    res = count_objects(array_tiles(a, tile), a.shape[1], 3)
    assert matches_regionprops(res, a, 1) + matches_regionprops(res, a, 2) == 135
    o = res[1]["objects"]
    cut = ((o["mx0"] // tile) != ((o["mx1"] - 1) // tile)) | ((o["my0"] // tile) != ((o["my1"] - 1) // tile))
    assert cut.sum() > (50 if tile == 37 else 5 if tile == 128 else -1)


@pytest.mark.parametrize("tile", [1, 3, 7])
def test_morphometrics_with_tiles_smaller_than_the_objects(tile):
    """Objects with holes, islands, corner contacts and one-pixel parts, cut by tiles of 1 to
    7 px: every pixel's perimeter weight needs 2 px of its neighbours, in other tiles."""
    rng = np.random.default_rng(tile)
    f = ndi.gaussian_filter(rng.random((40, 52)), 2)
    f = (f - f.mean()) / f.std()
    a = np.zeros(f.shape, np.uint8)
    a[f > 0.2] = 1
    a[f > 1.0] = 2
    a[rng.random(a.shape) < 0.05] = 0
    a[rng.random(a.shape) < 0.02] = 1
    res = count_objects(array_tiles(a, tile), a.shape[1], 3)
    assert matches_regionprops(res, a, 1) + matches_regionprops(res, a, 2) > 30


@needs_data
@pytest.mark.parametrize("tile", [37, 128, 4096])
def test_object_geometry_matches_whole_image_labelling(tile):
    """Area, centroid and bounding box of each object, tiled, equal scipy's on the whole
    mask: the MICCAI image05 nuclei (346, 863 x 597 px), many cut by tile borders."""
    ids = read_text_mask(str(DATA / "labeled" / "miccai2015-nuclei-seg-training" / "image05_mask.txt"))
    a = (ids > 0).astype(np.uint8)
    a[(ids > 0) & (ids % 5 == 0)] = 2  # a second class, touching the first
    res = count_objects(array_tiles(a, tile), a.shape[1], 3)
    for k in (1, 2):
        lab, n = ndi.label(a == k, structure=np.ones((3, 3)))
        idx = np.arange(1, n + 1)
        com = np.array(ndi.center_of_mass(a == k, lab, idx)) + 0.5
        boxes = ndi.find_objects(lab)
        want = sorted(
            zip(
                np.bincount(lab.ravel())[1:].tolist(),
                np.round(com[:, 1], 6),
                np.round(com[:, 0], 6),
                [b[1].start for b in boxes],
                [b[0].start for b in boxes],
                [b[1].stop for b in boxes],
                [b[0].stop for b in boxes],
            )
        )
        o = res[k]["objects"]
        got = sorted(
            zip(
                o["area"].tolist(),
                np.round(o["cx"], 6),
                np.round(o["cy"], 6),
                o["mx0"].tolist(),
                o["my0"].tolist(),
                o["mx1"].tolist(),
                o["my1"].tolist(),
            )
        )
        assert n > 20 and got == want


def test_objects_table_in_slide_coordinates(tmp_path):
    """objects.csv.gz: µm and level-0 px on the slide, one id per object over all classes."""
    a = np.zeros((50, 60), np.uint8)
    a[10:20, 4:8] = 1  # 40 px, centroid (6, 15) in mask px
    a[30, 59] = 2  # one pixel at the right edge
    res = count_objects(array_tiles(a, 16), 60, 3)
    path = str(tmp_path / "objects.csv.gz")
    # mask at 0.5 µm/px of a slide scanned at 0.25 µm/px: 2 level-0 px per mask px
    n = write_objects(path, object_rows(res, ["background", "nucleus", "mitosis"], 0.5, 2.0, "s1", chunk=1))
    t = pd.read_csv(path)
    assert n == 2 and t.columns.tolist() == OBJECT_COLUMNS
    r = t.iloc[0]
    assert (r["object_id"], r["class"], r["area_um2"]) == (1, "nucleus", 10.0)
    assert (r["centroid_x_px"], r["centroid_y_px"], r["centroid_x_um"], r["centroid_y_um"]) == (12, 30, 3, 7.5)
    assert (r["bbox_x_px"], r["bbox_y_px"], r["bbox_width_px"], r["bbox_height_px"]) == (8, 20, 8, 20)
    assert r["equivalent_diameter_um"] == pytest.approx(2 * np.sqrt(10 / np.pi), abs=0.01)
    # 4 x 10 px: ellipse axes 4 sqrt((n² - 1) / 12) along each side, upright; its own hull
    assert (r["major_axis_um"], r["minor_axis_um"]) == (
        round(2 * math.sqrt(99 / 12), 2),
        round(2 * math.sqrt(15 / 12), 2),
    )
    assert (r["orientation_deg"], r["solidity"], r["eccentricity"]) == (90, 1, round(math.sqrt(1 - 15 / 99), 4))
    assert r["perimeter_um"] == (2 * 14 - 4) * 0.5  # 24 border pixels of weight 1
    assert r["circularity"] == round(4 * math.pi * 40 / 24**2, 4)
    # the two objects' centroids are 26.75 and 7.75 µm apart: no neighbour within 25 µm
    assert r["neighbours_25um"] == 0 and r["nearest_neighbour_um"] == round(math.hypot(26.75, 7.75), 2)
    assert t[["mean_red", "mean_hematoxylin_od"]].isna().all().all()  # no slide read: no colour
    r = t.iloc[1]
    assert (r["object_id"], r["class"], r["centroid_x_px"], r["bbox_width_px"]) == (2, "mitosis", 119, 2)
    empty = str(tmp_path / "none.csv.gz")
    assert (
        write_objects(empty, object_rows(count_objects(array_tiles(a * 0, 16), 60, 3), ["b", "n", "m"], 0.5, 2, "s"))
        == 0
    )
    assert pd.read_csv(empty).columns.tolist() == OBJECT_COLUMNS


def by_box(o: dict) -> dict:
    """Object index by bounding box (mx0, my0, mx1, my1) in mask px."""
    return {b: i for i, b in enumerate(zip(*(o[f].tolist() for f in ("mx0", "my0", "mx1", "my1"))))}


@needs_data
def test_stain_and_colour_by_hand_on_cmu(tmp_path):
    """Mean RGB and haematoxylin / eosin optical density of nuclei of CMU-1 (read at
    0.5 µm/px, resampled from its 0.499 µm/px), computed by the stats stage tile by tile
    (64 px mask tiles: most nuclei cut), equal a computation over one read of the whole
    region: the mean of the pixels, and 6 x scikit-image's rgb2hed."""
    x0, y0, w, h = 900, 1000, 400, 300  # mask px: a region of tissue
    with open_slide(str(CMU)) as slide:
        geom = Geometry.for_slide(slide, 0.5)
        rgb = read_target(slide, geom, x0, y0, w, h).astype(np.float64)
    assert geom.needs_resampling
    hed = 6 * rgb2hed(rgb / 255)
    region = ndi.binary_opening(ndi.gaussian_filter(hed[..., 0], 1) > 0.4)
    a = np.zeros((geom.height, geom.width), np.uint8)
    a[y0 : y0 + h, x0 : x0 + w] = region
    pixels = SlidePixels(str(CMU), "cmu", None, geom)
    row, counts = measure(write_mask(tmp_path / "m.tif", a, tile=64), ["background", "nucleus"], 0.5, pixels=pixels)
    o = counts[1]["objects"]
    index = by_box(o)
    lab, n = ndi.label(region, structure=np.ones((3, 3)))
    assert n == row["nucleus_count"] > 50 and pixels.unreadable == 0
    idx = np.arange(1, n + 1)
    for name, values in (
        ("mean_red", rgb[..., 0]),
        ("mean_green", rgb[..., 1]),
        ("mean_blue", rgb[..., 2]),
        ("mean_hematoxylin_od", hed[..., 0]),
        ("mean_eosin_od", hed[..., 1]),
    ):
        want = ndi.mean(values, lab, idx)
        got = np.empty(n)
        for j, b in enumerate(ndi.find_objects(lab)):
            got[j] = o[name][index[(b[1].start + x0, b[0].start + y0, b[1].stop + x0, b[0].stop + y0)]]
        assert np.allclose(got, want, rtol=1e-9), name
    assert 0.4 < row["nucleus_median_hematoxylin_od"] < 1.5 and np.median(o["mean_eosin_od"]) < 0.4


def test_unreadable_slide_regions_leave_only_their_objects_without_colour(tmp_path):
    """A slide with one damaged JPEG tile (what the segment stage leaves as background):
    objects whose pixels need it get no colour, the others in the same mask tile still do
    (each read on its own), equal to reading them alone."""
    path = tmp_path / "corrupt.tif"
    tx, ty = corrupt_slide(path)  # the damaged 256 px tile of level 1 (0.5 µm/px)
    with open_slide(str(path)) as slide:
        geom = Geometry.for_slide(slide, 0.5)
    assert geom.level == 1 and not geom.needs_resampling
    a = np.zeros((geom.height, geom.width), np.uint8)
    for y in range(4, geom.height - 8, 24):
        for x in range(4, geom.width - 8, 24):
            a[y : y + 6, x : x + 6] = 1
    pixels = SlidePixels(str(path), "corrupt", None, geom)
    _, counts = measure(write_mask(tmp_path / "m.tif", a, tile=128), ["background", "nucleus"], 0.5, pixels=pixels)
    o = counts[1]["objects"]
    damaged = (o["mx1"] > tx) & (o["mx0"] < tx + 256) & (o["my1"] > ty) & (o["my0"] < ty + 256)
    assert pixels.unreadable > 0 and damaged.sum() > 50
    assert np.isnan(o["mean_red"][damaged]).all() and np.isfinite(o["mean_red"][~damaged]).all()
    with open_slide(str(path)) as slide:
        for i in np.flatnonzero(~damaged)[::40]:
            box = read_target(slide, geom, int(o["mx0"][i]), int(o["my0"][i]), 6, 6)
            assert o["mean_green"][i] == pytest.approx(box[..., 1].astype(np.float64).mean(), rel=1e-12)
