"""Stitch: the tile store becomes a pyramidal, tiled, compressed OME-TIFF mask.

Written from generators (tifffile), level by level; each sub-resolution is
first built as a half-size tile store on disk, so peak memory is a few tiles
whatever the slide's area. Labels are uint8 class indices (0 = background and
non-tissue), downsampled by nearest neighbour (every second pixel) so that
class indices stay valid at every level.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import tifffile

from .store import TileStore

#: overlay colours per class index (class 0 is not drawn)
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [145, 30, 180],
     [70, 240, 240], [245, 130, 48], [240, 50, 230], [210, 245, 60]],
    np.uint8,
)


def _tiles(store: TileStore, tile: int):
    for y in range(0, store.height, tile):
        for x in range(0, store.width, tile):
            yield store.read(y, x, tile, tile)


def write_ome_tiff(
    store: TileStore,
    path: str,
    mpp: float,
    name: str = "mask",
    tile: int = 512,
    compression: str = "zlib",
    min_level_size: int = 512,
    workdir: str | None = None,
) -> int:
    """Write ``store`` as pyramidal OME-TIFF (BigTIFF). Returns the number of levels."""
    tmp = tempfile.mkdtemp(prefix="pyramid-", dir=workdir or os.path.dirname(os.path.abspath(path)))
    try:
        levels = [store]
        while max(levels[-1].shape) > min_level_size:
            levels.append(levels[-1].downsample2(os.path.join(tmp, f"level{len(levels)}")))
        part = path + ".part"
        meta = {
            "axes": "YX",
            "Name": name,
            "PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm",
        }
        with tifffile.TiffWriter(part, bigtiff=True, ome=True) as tif:
            for i, lvl in enumerate(levels):
                lvl_mpp = mpp * (store.width / lvl.width)
                kwargs = dict(
                    shape=lvl.shape, dtype=np.uint8, tile=(tile, tile), compression=compression,
                    photometric="minisblack",
                    resolution=(1e4 / lvl_mpp, 1e4 / lvl_mpp), resolutionunit="CENTIMETER",
                )
                if i == 0:
                    tif.write(_tiles(lvl, tile), subifds=len(levels) - 1, metadata=meta, **kwargs)
                else:
                    tif.write(_tiles(lvl, tile), subfiletype=1, metadata=None, **kwargs)
        os.replace(part, path)
        return len(levels)
    finally:
        for lvl in levels[1:] if "levels" in locals() else []:
            lvl.close()
        shutil.rmtree(tmp, ignore_errors=True)


def smallest_level(path: str, min_side: int) -> tuple[np.ndarray, float]:
    """The smallest pyramid level of a mask OME-TIFF whose sides are >= ``min_side``
    (or level 0), and its downsample relative to level 0."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        full_w = series.levels[0].shape[-1]
        chosen = series.levels[0]
        for lvl in series.levels:
            if min(lvl.shape[-2:]) >= min_side:
                chosen = lvl
        return chosen.asarray(), full_w / chosen.shape[-1]


def overlay(thumb: np.ndarray, mask_path: str, alpha: float = 0.45, tissue: np.ndarray | None = None,
            strip: int = 256) -> np.ndarray:
    """Thumbnail with the mask's classes drawn over it (and the tissue outline).

    Works in strips of ``strip`` rows, so temporaries stay small whatever the thumbnail size.
    """
    from scipy import ndimage as ndi

    th, tw = thumb.shape[:2]
    with tifffile.TiffFile(mask_path) as tif:
        full_h, full_w = tif.series[0].levels[0].shape[-2:]
    labels, ds = smallest_level(mask_path, min(th, tw))
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

def run(store_path: str, plan_json: str, thumb_png: str, tissue_png: str, slide_id: str, out_mask: str,
        out_overlay: str, out_json: str, tiff_tile: int = 512, compression: str = "zlib", log=print) -> dict:
    """Stitch stage: mask.ome.tif (pyramidal) and overlay.png."""
    import time

    from PIL import Image

    from .runner import read_json, write_json
    from .tissue import load_mask

    t0 = time.monotonic()
    meta = read_json(plan_json)
    mpp = meta["geometry"]["target_mpp"]
    with TileStore(store_path) as store:
        n = write_ome_tiff(store, out_mask, mpp, name=slide_id, tile=tiff_tile, compression=None if compression == "none" else compression)
        log(f"mask {store.width}x{store.height} px at {mpp} µm/px, {n} levels -> {out_mask}")
    thumb = np.asarray(Image.open(thumb_png).convert("RGB"))
    Image.fromarray(overlay(thumb, out_mask, tissue=load_mask(tissue_png))).save(out_overlay)
    info = dict(slide_id=slide_id, levels=n, elapsed_s=time.monotonic() - t0)
    write_json(out_json, info)
    return info
