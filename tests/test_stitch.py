import numpy as np
import openslide
import pytest
import tifffile

from wsiseg.mask import write_ome_tiff
from wsiseg.stitch import overlay
from wsiseg.store import TileStore


def _labels(h, w, seed=0):
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w), np.uint8)
    for _ in range(60):
        y, x = rng.integers(0, h), rng.integers(0, w)
        a[y : y + rng.integers(5, 80), x : x + rng.integers(5, 80)] = rng.integers(1, 3)
    return a


def _store(path, arr, chunk):
    st = TileStore.create(str(path), *arr.shape, chunk)
    for r in range(st.rows):
        for c in range(st.cols):
            st.write_chunk(r, c, arr[r * chunk : (r + 1) * chunk, c * chunk : (c + 1) * chunk])
    return st


def test_store_roundtrip_and_sparse_regions(tmp_path):
    arr = _labels(700, 900)
    st = _store(tmp_path / "s", arr, 128)
    assert np.array_equal(st.read(0, 0, 900, 700), arr)
    assert np.array_equal(st.read(850, 650, 100, 100)[:50, :50], arr[650:, 850:])
    assert not st.read(850, 650, 100, 100)[50:].any()
    half = st.downsample2(str(tmp_path / "h"))
    assert np.array_equal(half.read(0, 0, 450, 350), arr[::2, ::2])


def test_ome_tiff_pyramid_opens_in_tifffile_and_openslide(tmp_path):
    arr = _labels(1300, 1700, seed=2)
    st = _store(tmp_path / "s", arr, 256)
    out = tmp_path / "mask.ome.tif"
    n = write_ome_tiff(st, str(out), mpp=0.5, name="s1", tile=256, min_level_size=256)
    assert n == 4
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.is_bigtiff
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == [(1300, 1700), (650, 850), (325, 425), (163, 213)]
        page = levels[0].keyframe
        assert page.is_tiled and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE and page.dtype == np.uint8
        assert np.array_equal(levels[0].asarray(), arr)
        assert np.array_equal(levels[2].asarray(), arr[::4, ::4])  # nearest: class indices stay valid
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata
    s = openslide.OpenSlide(str(out))
    assert s.dimensions == (1700, 1300)
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    region = np.asarray(s.read_region((300, 400), 0, (50, 40)))[..., 0]
    assert np.array_equal(region, arr[400:440, 300:350])
    assert not list(tmp_path.glob("pyramid-*"))  # temporary levels removed


def test_overlay_colours_mask_on_thumbnail(tmp_path):
    arr = np.zeros((400, 600), np.uint8)
    arr[100:300, 300:600] = 1
    st = _store(tmp_path / "s", arr, 128)
    write_ome_tiff(st, str(tmp_path / "m.tif"), mpp=1.0, tile=128, min_level_size=128)
    thumb = np.full((100, 150, 3), 255, np.uint8)
    ov = overlay(thumb, str(tmp_path / "m.tif"))
    assert ov.shape == thumb.shape
    assert (ov[50, 100] != 255).any() and (ov[10, 10] == 255).all()
