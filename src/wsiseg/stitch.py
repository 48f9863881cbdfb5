"""Stitch stage (rule 'stitch'): the tile store becomes the mask (:mod:`wsiseg.mask`),
and the overlay of the mask on the slide's thumbnail."""

from __future__ import annotations

import numpy as np

from .mask import MaskReader, write_ome_tiff
from .store import TileStore

#: overlay colours per class index (class 0 is not drawn)
PALETTE = np.array(
    [
        [0, 0, 0],
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [255, 225, 25],
        [145, 30, 180],
        [70, 240, 240],
        [245, 130, 48],
        [240, 50, 230],
        [210, 245, 60],
    ],
    np.uint8,
)


def overlay(
    thumb: np.ndarray, mask_path: str, alpha: float = 0.45, tissue: np.ndarray | None = None, strip: int = 256
) -> np.ndarray:
    """Thumbnail with the mask's classes drawn over it (and the tissue outline).

    Works in strips of ``strip`` rows, so temporaries stay small whatever the thumbnail size.
    """
    from scipy import ndimage as ndi

    th, tw = thumb.shape[:2]
    mask = MaskReader(mask_path)
    full_h, full_w = mask.shape
    labels, ds = mask.smallest_level(min(th, tw))
    ys = np.minimum(((np.arange(th) + 0.5) * full_h / th / ds).astype(np.int64), labels.shape[0] - 1)
    xs = np.minimum(((np.arange(tw) + 0.5) * full_w / tw / ds).astype(np.int64), labels.shape[1] - 1)
    edge = None
    if tissue is not None and tissue.shape == (th, tw):
        edge = tissue & ~ndi.binary_erosion(tissue)
    out = thumb.copy()
    for y0 in range(0, th, strip):
        y1 = min(th, y0 + strip)
        lab = labels[np.ix_(ys[y0:y1], xs)]
        drawn = lab > 0
        if drawn.any():
            colours = PALETTE[lab[drawn] % len(PALETTE)].astype(np.float32)
            px = out[y0:y1][drawn].astype(np.float32)
            out[y0:y1][drawn] = np.round((1 - alpha) * px + alpha * colours).astype(np.uint8)
        if edge is not None:
            out[y0:y1][edge[y0:y1]] = (0, 0, 0)
    return out


def run(
    *,
    store_path: str,
    plan_json: str,
    thumb_png: str,
    tissue_png: str,
    slide_id: str,
    out_mask: str,
    out_overlay: str,
    out_json: str,
    tiff_tile: int = 512,
    compression: str = "zlib",
    log=print,
) -> dict:
    """Stitch stage: mask.ome.tif (pyramidal) and overlay.png."""
    import time

    from PIL import Image

    from .runner import write_json
    from .tiling import Plan
    from .tissue import load_mask

    t0 = time.monotonic()
    mpp = Plan.read_meta(plan_json).geometry.target_mpp
    with TileStore(store_path) as store:
        n = write_ome_tiff(
            store,
            out_mask,
            mpp,
            name=slide_id,
            tile=tiff_tile,
            compression=None if compression == "none" else compression,
        )
        log(f"mask {store.width}x{store.height} px at {mpp} µm/px, {n} levels -> {out_mask}")
    thumb = np.asarray(Image.open(thumb_png).convert("RGB"))
    Image.fromarray(overlay(thumb, out_mask, tissue=load_mask(tissue_png))).save(out_overlay)
    info = dict(slide_id=slide_id, levels=n, elapsed_s=time.monotonic() - t0)
    write_json(out_json, info)
    return info
