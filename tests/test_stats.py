import numpy as np
import pandas as pd
import pytest
from conftest import DATA, needs_data
from helpers import array_tiles, slide_stats
from scipy import ndimage as ndi

from wsiseg.labels import read_text_mask
from wsiseg.mask import write_ome_tiff
from wsiseg.objects import OBJECT_COLUMNS, count_objects, object_rows, write_objects
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


def test_slide_stats_areas_from_pixel_counts(tmp_path):
    a = np.zeros((600, 700), np.uint8)
    a[10:60, 10:110] = 1  # 5000 px
    a[500:600, 600:700] = 1  # 10000 px, at the bottom-right edge
    a[200:220, 200:230] = 2  # 600 px
    st = TileStore.create(str(tmp_path / "s"), 600, 700, 256)
    for r in range(st.rows):
        for c in range(st.cols):
            st.write_chunk(r, c, a[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256])
    write_ome_tiff(st, str(tmp_path / "m.tif"), mpp=0.5, tile=128)
    row = slide_stats(str(tmp_path / "m.tif"), ["background", "tumour", "stroma"], 0.5)
    assert row["tumour_count"] == 2 and row["stroma_count"] == 1
    assert row["tumour_area_mm2"] == pytest.approx(15000 * 0.25 / 1e6)
    assert row["tumour_mean_area_um2"] == pytest.approx(7500 * 0.25)
    assert row["tumour_median_area_um2"] == pytest.approx(7500 * 0.25)
    assert row["stroma_area_mm2"] == pytest.approx(600 * 0.25 / 1e6)


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
    r = t.iloc[1]
    assert (r["object_id"], r["class"], r["centroid_x_px"], r["bbox_width_px"]) == (2, "mitosis", 119, 2)
    empty = str(tmp_path / "none.csv.gz")
    assert (
        write_objects(empty, object_rows(count_objects(array_tiles(a * 0, 16), 60, 3), ["b", "n", "m"], 0.5, 2, "s"))
        == 0
    )
    assert pd.read_csv(empty).columns.tolist() == OBJECT_COLUMNS
