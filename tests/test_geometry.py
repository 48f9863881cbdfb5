import numpy as np
from conftest import CMU, NDPI, needs_data

from wsiseg.geometry import Geometry, read_target, read_window
from wsiseg.slide import open_slide

pytestmark = needs_data  # reads ../shared/data


def test_geometry_reads_level_at_or_above_target():
    with open_slide(str(NDPI)) as s:
        g = Geometry.for_slide(s, 0.5)
    assert g.level == 1 and g.level_downsample == 2
    assert g.width == round(3968 * s.mpp / 0.5) and g.height == round(4864 * s.mpp / 0.5)
    assert 1.0 < g.scale < 1.2 and g.needs_resampling


def test_resampling_is_window_independent():
    """A target pixel has the same value in every window containing it (no seams)."""
    with open_slide(str(CMU)) as s:
        g = Geometry.for_slide(s, 1.3)  # x2.6 downsampling from level 0
        big = read_target(s, g, 100, 200, 300, 250)
        small = read_target(s, g, 217, 301, 45, 66)
        assert np.allclose(big[101:167, 117:162], small, atol=1e-3)


def test_no_resampling_when_level_matches():
    with open_slide(str(CMU)) as s:
        g = Geometry.for_slide(s, s.mpp)
        assert not g.needs_resampling
        assert np.array_equal(read_target(s, g, 10, 20, 30, 40), s.read_level(0, 10, 20, 30, 40).astype(np.float32))


def test_window_mirrors_at_slide_edges():
    with open_slide(str(CMU)) as s:
        g = Geometry.for_slide(s, 2.0)
        inside = read_target(s, g, 0, 0, 40, 40)
        win = read_window(s, g, -16, -16, 56)
        # reflect, without repeating the edge pixel (U-Net overlap-tile)
        assert np.array_equal(win[16:, 16:], inside)
        assert np.array_equal(win[16 - 5, 16:], inside[5])
        assert np.array_equal(win[16:, 16 - 3], inside[:, 3])
        # and at the right/bottom edge
        W, H = g.width, g.height
        edge = read_target(s, g, W - 30, H - 30, 30, 30)
        win = read_window(s, g, W - 30, H - 30, 50)
        assert np.array_equal(win[:30, :30], edge)
        assert np.array_equal(win[:30, 30 + 4], edge[:, 30 - 2 - 4])


def test_converters_between_planes():
    with open_slide(str(CMU)) as s:
        g = Geometry.for_slide(s, 1.3)
    assert g.target_to_level0(10) == 10 * g.scale0 == 10 * 1.3 / g.mpp0
    assert g.level0_to_target(g.target_to_level0(123)) == 123
    assert g.target_to_level(10) == 10 * g.scale0 / g.level_downsample
