"""A sample of a slide's planned tiles and their windows, for the plan stage's per-slide
calibration (:meth:`wsiseg.models.spec.ModelSpec.calibrate`): one window in memory at a time."""

from __future__ import annotations

import numpy as np

from ..geometry import read_window
from ..tiling import plan_rows


def sample_rows(n_tiles: int, n_sample: int) -> np.ndarray:
    """Evenly spread plan rows (deterministic)."""
    if n_tiles <= n_sample:
        return np.arange(n_tiles)
    return np.unique(np.linspace(0, n_tiles - 1, n_sample).round().astype(np.int64))


def sampled_windows(opener, geom, tiles, rows, log, who: str, write_region: bool = False):
    """Yield the read windows (or only their write regions) of plan ``rows`` (positions in
    ``tiles``, a DataFrame or its rows), as float32 RGB in [0, 255].

    A sampled tile that cannot be decoded is skipped and logged (``who`` says for what),
    and the slide reopened, as OpenSlide's handle stays in an error state.
    """
    from ..errors import SlideError

    plan = plan_rows(tiles)  # a DataFrame or its rows
    slide = opener()
    try:
        for i in rows:
            t = plan[i]
            wx, wy, n = int(t.wx), int(t.wy), int(t.n)
            try:
                img = read_window(slide, geom, wx, wy, n)
            except SlideError as exc:
                log(f"{who}: sampled tile row {t.row} col {t.col} skipped: {exc.problem}")
                slide.close()
                slide = opener()
                continue
            if write_region:
                y, x = int(t.ty) - wy, int(t.tx) - wx
                img = img[y : y + int(t.th), x : x + int(t.tw)]
            yield img
    finally:
        slide.close()
