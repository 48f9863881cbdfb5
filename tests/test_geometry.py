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


def _resample_by_formula(src, jy, wy, jx, wx):
    """The resampling as its docstring states it: rows, then columns, each output px the
    float32 sum of all its taps' products in tap order (whole-array passes)."""
    src = src.astype(np.float32)
    rows = np.zeros((jy.shape[0], src.shape[1], 3), np.float32)
    for k in range(jy.shape[1]):
        rows += wy[:, k, None, None] * src[jy[:, k]]
    out = np.zeros((jy.shape[0], jx.shape[0], 3), np.float32)
    for k in range(jx.shape[1]):
        out += wx[None, :, k, None] * rows[:, jx[:, k]]
    return out


def test_resampling_is_bit_identical_to_the_formula():
    """The strip-wise resampler (zero taps skipped, contiguous taps as slices) gives every
    target px bit for bit the value of the plain formula, for upsampling, near-1 factors
    (a 0.499 µm/px slide read at 0.5) and downsampling, on real pixels and at the level's edge."""
    from wsiseg.geometry import _resample, _taps

    with open_slide(str(CMU)) as s:
        for scale, t0, n in [(1.002, 700, 736), (0.99975, 0, 300), (1.0957, 40, 257), (3.3, 0, 170), (1.4, 900, 64)]:
            size = (s.dimensions[0], s.dimensions[1])
            x_lo, x_hi, jx, wx = _taps(t0, n, scale, size[0])
            y_lo, y_hi, jy, wy = _taps(t0 // 2, n - 7, scale, size[1])
            src = s.read_level(0, x_lo, y_lo, x_hi - x_lo + 1, y_hi - y_lo + 1)
            got = _resample(src, jy, wy, jx, wx)
            assert got.tobytes() == _resample_by_formula(src, jy, wy, jx, wx).tobytes(), scale
        # the last target px of the level: taps beyond it are dropped
        g = Geometry.for_slide(s, 0.5)
        assert g.needs_resampling
        x_lo, x_hi, jx, wx = _taps(g.width - 40, 40, g.scale, g.level_width)
        y_lo, y_hi, jy, wy = _taps(g.height - 33, 33, g.scale, g.level_height)
        src = s.read_level(0, x_lo, y_lo, x_hi - x_lo + 1, y_hi - y_lo + 1)
        ref = _resample_by_formula(src, jy, wy, jx, wx)
        assert read_target(s, g, g.width - 40, g.height - 33, 40, 33).tobytes() == ref.tobytes()
