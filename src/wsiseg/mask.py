"""The mask artefact (mask.ome.tif): its one writer and its one reader.

The mask is uint8 class indices in target (mask) px, 0 = background and non-tissue,
stored as a pyramidal, tiled, compressed OME-TIFF (BigTIFF) with its mpp. Stats
(:mod:`wsiseg.stats`) and the overlay (:mod:`wsiseg.stitch`) read it only through
:class:`MaskReader`; a second mask format (e.g. OME-Zarr) is one writer and one
reader here.

Sub-resolutions are built as half-size tile stores on disk (nearest neighbour:
every second pixel, so class indices stay valid at every level), so peak memory is a
few tiles whatever the slide's area.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import tifffile

from .store import TileStore


def _tiles(store: TileStore, tile: int):
    for y in range(0, store.height, tile):
        for x in range(0, store.width, tile):
            yield store.read(x, y, tile, tile)


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
            "PhysicalSizeX": mpp,
            "PhysicalSizeXUnit": "µm",
            "PhysicalSizeY": mpp,
            "PhysicalSizeYUnit": "µm",
        }
        with tifffile.TiffWriter(part, bigtiff=True, ome=True) as tif:
            for i, lvl in enumerate(levels):
                lvl_mpp = mpp * (store.width / lvl.width)
                kwargs = dict(
                    shape=lvl.shape,
                    dtype=np.uint8,
                    tile=(tile, tile),
                    compression=compression,
                    photometric="minisblack",
                    resolution=(1e4 / lvl_mpp, 1e4 / lvl_mpp),
                    resolutionunit="CENTIMETER",
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


class MaskReader:
    """Read a mask written by :func:`write_ome_tiff`: its size, its level-0 tiles in raster
    order, and a small pyramid level (overlays)."""

    def __init__(self, path: str):
        self.path = path
        with tifffile.TiffFile(path) as tif:
            self.height, self.width = tif.series[0].levels[0].shape[-2:]

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def tiles(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(x, y, tile) of level 0 in mask px, in raster order, cropped to the image."""
        h, w = self.height, self.width
        with tifffile.TiffFile(self.path) as tif:
            page = tif.series[0].levels[0].keyframe
            for seg, idx, _ in page.segments(sort=True, maxworkers=1):
                y, x = idx[2], idx[3]
                tile = seg[0, :, :, 0] if seg.ndim == 4 else seg[0]
                yield x, y, tile[: h - y, : w - x]

    def smallest_level(self, min_side: int) -> tuple[np.ndarray, float]:
        """The smallest pyramid level whose sides are >= ``min_side`` (or level 0), and its
        downsample relative to level 0."""
        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            full_w = series.levels[0].shape[-1]
            chosen = series.levels[0]
            for lvl in series.levels:
                if min(lvl.shape[-2:]) >= min_side:
                    chosen = lvl
            return chosen.asarray(), full_w / chosen.shape[-1]
