import numpy as np
import pytest
from scipy import ndimage as ndi

from wsiseg.stats import array_tiles, count_objects, slide_stats
from wsiseg.stitch import write_ome_tiff
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
