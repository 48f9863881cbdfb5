"""A chunked on-disk array of uint8 labels: one fixed-size square chunk per tile.

Layout: a folder with ``meta.json`` and ``data.bin``, where chunk (r, c) is the
contiguous run of ``chunk*chunk`` bytes at offset ``(r*cols + c) * chunk*chunk``.
Chunks never written read as zeros (the file is sparse), so background costs no
disk on file systems with holes. Reads and writes use ``pread``/``pwrite``:
nothing is memory-mapped, and memory is bounded by the region asked for.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np


class TileStore:
    def __init__(self, path: str, mode: str = "r"):
        self.path = path
        with open(os.path.join(path, "meta.json")) as fh:
            meta = json.load(fh)
        self.height, self.width, self.chunk = meta["height"], meta["width"], meta["chunk"]
        self.rows, self.cols = math.ceil(self.height / self.chunk), math.ceil(self.width / self.chunk)
        flags = os.O_RDWR if mode == "r+" else os.O_RDONLY
        self._fd = os.open(os.path.join(path, "data.bin"), flags)

    @classmethod
    def create(cls, path: str, height: int, width: int, chunk: int) -> TileStore:
        os.makedirs(path, exist_ok=True)
        rows, cols = math.ceil(height / chunk), math.ceil(width / chunk)
        with open(os.path.join(path, "data.bin"), "wb") as fh:
            fh.truncate(rows * cols * chunk * chunk)
        with open(os.path.join(path, "meta.json"), "w") as fh:
            json.dump(dict(height=height, width=width, chunk=chunk, dtype="uint8"), fh)
        return cls(path, "r+")

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _offset(self, r: int, c: int) -> int:
        return (r * self.cols + c) * self.chunk * self.chunk

    def write_chunk(self, r: int, c: int, data: np.ndarray) -> None:
        """Write chunk (r, c); ``data`` may be smaller at the right/bottom edge."""
        assert 0 <= r < self.rows and 0 <= c < self.cols
        k = self.chunk
        buf = np.zeros((k, k), np.uint8)
        buf[: data.shape[0], : data.shape[1]] = data
        os.pwrite(self._fd, buf.tobytes(), self._offset(r, c))

    def read_chunk(self, r: int, c: int) -> np.ndarray:
        k = self.chunk
        raw = os.pread(self._fd, k * k, self._offset(r, c))
        return np.frombuffer(raw, np.uint8).reshape(k, k)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Region (x, y, w, h): px [x, x+w) x [y, y+h), as an (h, w) array; zeros outside the array."""
        out = np.zeros((h, w), np.uint8)
        k = self.chunk
        y1, x1 = min(y + h, self.height), min(x + w, self.width)
        for r in range(max(0, y) // k, (y1 - 1) // k + 1 if y1 > 0 else 0):
            for c in range(max(0, x) // k, (x1 - 1) // k + 1 if x1 > 0 else 0):
                tile = self.read_chunk(r, c)
                ty0, tx0 = r * k, c * k
                iy0, iy1 = max(y, ty0), min(y1, ty0 + k)
                ix0, ix1 = max(x, tx0), min(x1, tx0 + k)
                if iy1 > iy0 and ix1 > ix0:
                    out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = tile[iy0 - ty0 : iy1 - ty0, ix0 - tx0 : ix1 - tx0]
        return out

    def downsample2(self, path: str) -> TileStore:
        """A new store at half resolution (nearest: every second px), chunk by chunk."""
        h, w = math.ceil(self.height / 2), math.ceil(self.width / 2)
        out = TileStore.create(path, h, w, self.chunk)
        k = self.chunk
        for r in range(out.rows):
            for c in range(out.cols):
                region = self.read(2 * c * k, 2 * r * k, 2 * k, 2 * k)[::2, ::2]
                if region.any():
                    out.write_chunk(r, c, region)
        return out

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
