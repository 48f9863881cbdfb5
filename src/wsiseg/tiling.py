"""Tile plan: a regular grid of output tiles at the model's mpp, read with context.

Coordinate systems:
    level-0 px  -- the slide's full-resolution pixels
    level px    -- pixels of the pyramid level we read (``Geometry.level``)
    target px   -- pixels at the model's mpp; the mask is written in target px
    tile index  -- (row, col) of a tile in the grid; tile (r, c) writes target px
                   [c*T, c*T+T) x [r*T, r*T+T), clipped to the slide

Each tile has two regions (as in StarDist's ``big.py``):
    write region -- the ``tile_size`` square (clipped at the slide's right/bottom
                    edge) whose labels this tile owns in the mask
    read window  -- the write region grown by ``margin`` on every side (plus, for
                    networks with input-size constraints, a few px at right/bottom),
                    mirror-extrapolated (reflect) where it leaves the slide

Resampling from level px to target px uses a separable linear (triangle) filter
whose weights depend only on *global* target coordinates, so a pixel's value is
identical in every window that contains it: overlapping windows agree exactly,
which is what makes the stitched output seam-free.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .slide import Slide


@dataclass(frozen=True)
class Geometry:
    """Everything that maps the slide onto the target grid; computed once per slide."""

    width0: int  # level-0 px
    height0: int
    mpp0: float  # µm per level-0 px
    target_mpp: float  # µm per target px
    level: int  # pyramid level read
    level_downsample: float  # level-0 px per level px
    level_width: int  # level px
    level_height: int
    width: int  # target px
    height: int

    @property
    def scale0(self) -> float:
        """level-0 px per target px."""
        return self.target_mpp / self.mpp0

    @property
    def scale(self) -> float:
        """level px per target px (>= 1 up to rounding: we read at or above target resolution)."""
        return self.scale0 / self.level_downsample

    @property
    def needs_resampling(self) -> bool:
        return abs(self.scale - 1.0) > 1e-6

    @classmethod
    def for_slide(cls, slide: Slide, target_mpp: float) -> "Geometry":
        mpp0 = slide.require_mpp()
        scale0 = target_mpp / mpp0
        level = slide.best_level_for(scale0)
        lw, lh = slide.level_dimensions[level]
        w0, h0 = slide.dimensions
        return cls(
            width0=w0,
            height0=h0,
            mpp0=mpp0,
            target_mpp=float(target_mpp),
            level=level,
            level_downsample=float(slide.level_downsamples[level]),
            level_width=lw,
            level_height=lh,
            width=max(1, int(round(w0 / scale0))),
            height=max(1, int(round(h0 / scale0))),
        )

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ resampling
def _taps(t0: int, n: int, scale: float, src_len: int) -> tuple[int, int, np.ndarray, np.ndarray]:
    """Linear-interpolation taps for target px [t0, t0+n) along one axis.

    Each target px is a weighted sum of K source px (a band, not a dense matrix).
    The triangle filter is widened to ``scale`` when downsampling (antialiasing);
    taps outside the level are dropped and the rest renormalised. Taps and
    weights are functions of the global target coordinate only, and are summed
    in a fixed order, so a target px has the same value in every window.
    Returns (first source px, last source px, tap indices relative to the first (n, K), weights (n, K)).
    """
    centres = (np.arange(t0, t0 + n, dtype=np.float64) + 0.5) * scale - 0.5
    support = max(1.0, scale)
    k = int(math.ceil(2 * support)) + 1
    first = np.floor(centres - support).astype(np.int64) + 1
    js = first[:, None] + np.arange(k)[None, :]
    w = np.clip(1.0 - np.abs(centres[:, None] - js) / support, 0.0, None)
    w[(js < 0) | (js >= src_len)] = 0.0
    s = w.sum(axis=1, keepdims=True)
    empty = s[:, 0] == 0  # only beyond the last source px: take the nearest edge px
    if empty.any():
        js[empty, 0] = np.clip(np.round(centres[empty]), 0, src_len - 1).astype(np.int64)
        w[empty, 0], s[empty] = 1.0, 1.0
    w = w / s
    js = np.clip(js, 0, src_len - 1)
    used = w > 0
    lo, hi = int(js[used].min()), int(js[used].max())
    return lo, hi, np.clip(js - lo, 0, hi - lo), w.astype(np.float32)


def read_target(slide: Slide, geom: Geometry, tx: int, ty: int, w: int, h: int) -> np.ndarray:
    """RGB float32 (h, w, 3) in [0, 255] of target px [tx, tx+w) x [ty, ty+h), inside the slide."""
    assert 0 <= tx and 0 <= ty and tx + w <= geom.width and ty + h <= geom.height, (tx, ty, w, h)
    if not geom.needs_resampling:
        w_ok = min(w, geom.level_width - tx)
        h_ok = min(h, geom.level_height - ty)
        img = slide.read_level(geom.level, tx, ty, w_ok, h_ok).astype(np.float32)
        if (w_ok, h_ok) != (w, h):  # rounding of target size: repeat the last px
            img = np.pad(img, ((0, h - h_ok), (0, w - w_ok), (0, 0)), mode="edge")
        return img
    x_lo, x_hi, jx, wx = _taps(tx, w, geom.scale, geom.level_width)
    y_lo, y_hi, jy, wy = _taps(ty, h, geom.scale, geom.level_height)
    src = slide.read_level(geom.level, x_lo, y_lo, x_hi - x_lo + 1, y_hi - y_lo + 1).astype(np.float32)
    rows = np.zeros((h, src.shape[1], 3), np.float32)
    for k in range(jy.shape[1]):  # fixed tap order: identical sums in every window
        rows += wy[:, k, None, None] * src[jy[:, k]]
    out = np.zeros((h, w, 3), np.float32)
    for k in range(jx.shape[1]):
        out += wx[None, :, k, None] * rows[:, jx[:, k]]
    return out


def read_window(slide: Slide, geom: Geometry, wx: int, wy: int, n: int) -> np.ndarray:
    """Square read window (n, n, 3) at target px (wx, wy), reflect-padded outside the slide.

    The mirror is about the first/last pixel without repeating it (numpy 'reflect'),
    as in the U-Net paper's overlap-tile strategy; it repeats for windows wider
    than the slide.
    """
    x0, y0 = max(0, wx), max(0, wy)
    x1, y1 = min(geom.width, wx + n), min(geom.height, wy + n)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"window at {(wx, wy)} size {n} does not overlap the slide")
    img = read_target(slide, geom, x0, y0, x1 - x0, y1 - y0)
    pad = ((y0 - wy, wy + n - y1), (x0 - wx, wx + n - x1), (0, 0))
    if any(p for p in pad[:2] for p in p):
        mode = "reflect" if min(img.shape[:2]) > 1 else "edge"
        img = np.pad(img, pad, mode=mode)
    return img


# ------------------------------------------------------------------ tile plan
@dataclass(frozen=True)
class TileSpec:
    """How the network is fed: geometry shared by all tiles of a plan."""

    tile_size: int  # T: write region side, target px
    margin: int  # m: context per side, target px
    window: int  # n: read window side (T + 2m + extra), target px
    out_offset: int  # target px from window origin to the network output's first px
    align: int  # tile origins are multiples of this (2**depth)

    def __post_init__(self):
        assert self.tile_size % self.align == 0, "tile_size must be a multiple of 2**depth"
        assert self.window >= self.tile_size + 2 * self.margin
        assert 0 <= self.out_offset <= self.margin

    @property
    def keep(self) -> slice:
        """Where the write region sits in the network output (both axes)."""
        start = self.margin - self.out_offset
        return slice(start, start + self.tile_size)


def plan_tiles(geom: Geometry, spec: TileSpec, tissue: np.ndarray | None, tissue_ds0: float) -> pd.DataFrame:
    """Tile plan: one row per tile that touches tissue.

    ``tissue`` is a boolean mask where one pixel covers ``tissue_ds0`` level-0 px
    (None: every tile is kept). Columns: tile index (row, col), write region in
    target px (tx, ty, tw, th), read window in target px (wx, wy, n), write
    region in level-0 px (x0, y0, w0, h0) and tissue_fraction of the write region.
    """
    T = spec.tile_size
    rows, cols = math.ceil(geom.height / T), math.ceil(geom.width / T)
    recs = []
    for r in range(rows):
        for c in range(cols):
            tx, ty = c * T, r * T
            tw, th = min(T, geom.width - tx), min(T, geom.height - ty)
            x0, y0 = tx * geom.scale0, ty * geom.scale0
            w0, h0 = tw * geom.scale0, th * geom.scale0
            if tissue is None:
                frac = 1.0
            else:
                # tissue pixels whose footprint overlaps the write region
                a0 = int(math.floor(x0 / tissue_ds0))
                a1 = max(a0 + 1, int(math.ceil((x0 + w0) / tissue_ds0)))
                b0 = int(math.floor(y0 / tissue_ds0))
                b1 = max(b0 + 1, int(math.ceil((y0 + h0) / tissue_ds0)))
                sub = tissue[b0:b1, a0:a1]
                frac = float(sub.mean()) if sub.size else 0.0
            if frac <= 0:
                continue
            recs.append(
                dict(
                    row=r, col=c, tx=tx, ty=ty, tw=tw, th=th,
                    wx=tx - spec.margin, wy=ty - spec.margin, n=spec.window,
                    x0=int(round(x0)), y0=int(round(y0)), w0=int(round(w0)), h0=int(round(h0)),
                    tissue_fraction=round(frac, 4),
                )
            )
    cols_order = ["row", "col", "tx", "ty", "tw", "th", "wx", "wy", "n", "x0", "y0", "w0", "h0", "tissue_fraction"]
    return pd.DataFrame(recs, columns=cols_order)


def write_plan(path_tsv: str, path_json: str, plan: pd.DataFrame, geom: Geometry, spec: TileSpec, extra: dict) -> None:
    plan.to_csv(path_tsv, sep="\t", index=False)
    meta = dict(geometry=geom.to_dict(), tiles=asdict(spec), n_tiles=len(plan), **extra)
    with open(path_json, "w") as fh:
        json.dump(meta, fh, indent=2)


def read_plan(path_tsv: str, path_json: str) -> tuple[pd.DataFrame, Geometry, TileSpec, dict]:
    with open(path_json) as fh:
        meta = json.load(fh)
    plan = pd.read_csv(path_tsv, sep="\t")
    return plan, Geometry(**meta["geometry"]), TileSpec(**meta["tiles"]), meta


def tile_spec_for(model, tile_size: int, margin: int) -> TileSpec:
    """TileSpec for a loaded :class:`wsiseg.unet.ModelSpec` with a checked margin."""
    if tile_size % model.align:
        raise ValueError(
            f"tiling.tile_size={tile_size} must be a multiple of {model.align} (2**depth of model '{model.name}')"
        )
    n = model.legal_input(tile_size + 2 * margin)
    return TileSpec(tile_size=tile_size, margin=margin, window=n, out_offset=model.border, align=model.align)


def run(slide_path: str, slide_id: str, mpp, tissue_png: str, tissue_json: str, model_cfg: dict,
        tiling_cfg: dict, out_tsv: str, out_json: str, log=print) -> dict:
    """Tile-plan stage: plan.tsv + plan.json for one slide and one model."""
    import time

    from .runner import read_json
    from .slide import open_slide
    from .tissue import load_mask
    from .unet import load_model, plan_margin

    t0 = time.monotonic()
    model = load_model(model_cfg)
    margin = plan_margin(model, tiling_cfg.get("margin", "auto"), bool(tiling_cfg.get("allow_small_margin", False)), log)
    spec = tile_spec_for(model, int(tiling_cfg["tile_size"]), margin)
    tinfo = read_json(tissue_json)
    with open_slide(slide_path, slide_id, mpp) as slide:
        geom = Geometry.for_slide(slide, model.mpp)
        plan = plan_tiles(geom, spec, load_mask(tissue_png), tinfo["thumbnail_downsample"])
    extra = {}
    if model.kind == "classical":
        extra = classical_threshold_for(lambda: open_slide(slide_path, slide_id, mpp), geom, spec, plan, model_cfg, log)
    rows, cols = math.ceil(geom.height / spec.tile_size), math.ceil(geom.width / spec.tile_size)
    log(
        f"slide {geom.width0}x{geom.height0} level-0 px at {geom.mpp0:.4f} µm/px -> {geom.width}x{geom.height} "
        f"target px at {geom.target_mpp} µm/px, read from level {geom.level} (downsample {geom.level_downsample:g}, "
        f"resample x{1 / geom.scale:.4f})"
    )
    log(f"model halo {model.halo} px, border {model.border} px; tile {spec.tile_size} + margin {spec.margin} "
        f"-> window {spec.window} px; {len(plan)} of {rows * cols} tiles touch tissue")
    write_plan(out_tsv, out_json, plan, geom, spec, dict(
        slide_id=slide_id, model=model.name, model_checksum=model.checksum, halo=model.halo,
        grid_rows=rows, grid_cols=cols, elapsed_s=time.monotonic() - t0,
        tissue_downsample=tinfo["thumbnail_downsample"],
        model_classes=model.classes, mask_classes=model.mask_classes, postprocess=model.postprocess, **extra,
    ))
    return dict(n_tiles=len(plan))


CLASSICAL_SAMPLE_TILES = 64  # tissue tiles whose haematoxylin histogram sets a slide's threshold


def classical_threshold_for(opener, geom: Geometry, spec: TileSpec, plan: pd.DataFrame, model_cfg: dict, log) -> dict:
    """The classical model's one haematoxylin threshold for the whole slide (see wsiseg.classical).

    ``opener()`` opens the slide; a sampled tile that cannot be decoded is skipped
    (and the slide reopened, as OpenSlide's handle stays in an error state).
    """
    from . import classical
    from .errors import SlideError

    params = classical.params_from_cfg(model_cfg)
    rows = classical.sample_rows(len(plan), CLASSICAL_SAMPLE_TILES)

    def windows():
        slide = opener()
        try:
            for i in rows:
                try:
                    yield read_window(slide, geom, int(plan.wx.iat[i]), int(plan.wy.iat[i]), int(plan.n.iat[i]))
                except SlideError as exc:
                    log(f"classical model: sampled tile row {plan.row.iat[i]} col {plan.col.iat[i]} skipped: "
                        f"{exc.problem}")
                    slide.close()
                    slide = opener()
        finally:
            slide.close()

    try:
        thr = classical.slide_threshold(windows(), geom.target_mpp, params, spec.margin)
    except ValueError:  # no tiles, or uniform pixels: nothing to segment
        log("classical model: no tissue contrast to set the haematoxylin threshold; the mask will be empty")
        return dict(classical_threshold=None)
    log(f"classical model: haematoxylin threshold {thr:.4f} (Otsu over {len(rows)} tissue tiles)")
    return dict(classical_threshold=thr)
