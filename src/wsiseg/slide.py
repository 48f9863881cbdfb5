"""Open a slide, know its resolution, and read RGB regions from any pyramid level.

Coordinate systems (named everywhere in this package):
    level-0 px  -- pixels of the slide's full-resolution level
    level px    -- pixels of one pyramid level (level-0 px / level downsample)
    target px   -- pixels at the model's mpp (see ``geometry.Geometry``)

Backends: OpenSlide for every format it reads (SVS, NDPI, MRXS, DICOM, SCN,
generic tiled TIFF, ...). For TIFFs OpenSlide refuses (plain strip TIFF,
OME-TIFF) we fall back to tifffile, decoding only the strips/tiles a region
touches, so memory stays bounded by the region (and one strip) size.

The JPEG tiles of an SVS or generic tiled TIFF that OpenSlide opens are read and decoded
without OpenSlide where that gives OpenSlide's pixels (:mod:`wsiseg.jpeg_tiles`: the same
pixels, several times faster); a tile libjpeg warns about is OpenSlide's to decode or fail.

Every failure is raised as :class:`SlideError`, naming the slide and the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from .errors import SlideError

#: plausible brightfield/fluorescence scanner resolutions, µm per pixel
MPP_RANGE = (0.05, 20.0)


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (straight alpha, uint8) -> RGB composited on a white background."""
    if rgba.shape[-1] == 3:
        return rgba
    if rgba[..., 3].min() == 255:  # opaque (the usual case): the composite is the RGB itself
        return np.ascontiguousarray(rgba[..., :3])
    rgb = rgba[..., :3].astype(np.uint16)
    a = rgba[..., 3:4].astype(np.uint16)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def pil_on_white(img) -> np.ndarray:
    """A PIL image of OpenSlide's (RGBA, straight alpha) as :func:`composite_on_white` makes it:
    the same values, read-only.

    An opaque region (alpha 255 everywhere: every pixel the scanner imaged) is PIL's own
    RGBA -> RGB conversion, which drops the alpha band in C: about 1 ms for a 736-px window
    against 3 ms for numpy's copy of the RGBA array's strided RGB channels (and 0.5 ms for that
    array). A region with transparent pixels (outside the scanned area of some formats) is
    composited by :func:`composite_on_white`.
    """
    if img.mode == "RGBA" and img.getchannel("A").getextrema()[0] == 255:
        return np.asarray(img.convert("RGB"))
    return composite_on_white(np.asarray(img))


class _SegmentCache:
    """Decoded TIFF strips/tiles, least recently used dropped first, bounded in bytes.

    Plain strip TIFFs often hold many rows (sometimes the whole image) in one strip;
    without a cache every window would decode the same strips again.
    """

    def __init__(self, max_bytes: int = 256 << 20):
        from collections import OrderedDict

        self.max_bytes, self.bytes, self.items = max_bytes, 0, OrderedDict()

    def get(self, key):
        arr = self.items.get(key)
        if arr is not None:
            self.items.move_to_end(key)
        return arr

    def put(self, key, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        self.items[key] = arr
        self.bytes += arr.nbytes
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes


@dataclass
class Slide:
    """An open slide. Use :func:`open_slide`; close with :meth:`close` or ``with``."""

    name: str
    path: str
    backend: str
    vendor: str
    level_dimensions: list  # [(width, height)] in level px
    level_downsamples: list  # level-0 px per level px
    mpp: float | None  # µm per level-0 px
    mpp_source: str  # 'metadata', 'sheet' or 'missing'
    _handle: object = field(default=None, repr=False)
    _pages: list = field(default_factory=list, repr=False)
    _segment_cache: _SegmentCache = field(default=None, repr=False)
    _direct: object = field(default=None, repr=False)  # wsiseg.jpeg_tiles.DirectLevels (OpenSlide backend)
    metadata_mpp: float | None = None  # what the file says, whatever the sheet says
    openslide_error: str | None = None  # why OpenSlide refused it (tifffile backend)

    # ------------------------------------------------------------------ basics
    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self.level_dimensions[0])

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def direct_levels(self) -> list:
        """The levels whose JPEG tiles are decoded without OpenSlide (:mod:`wsiseg.jpeg_tiles`)."""
        return [] if self._direct is None else self._direct.levels

    def require_mpp(self) -> float:
        """The level-0 mpp, or a SlideError saying how to provide it."""
        if self.mpp is not None:
            return _check_mpp(self.name, self.mpp, self.mpp_source)
        if self.mpp is None:
            raise SlideError(
                self.name,
                "the file has no resolution (mpp) in its metadata",
                "add the µm per pixel of level 0 in the 'mpp' column of the sample sheet "
                "(typically 0.25 for a 40x scan, 0.5 for 20x)",
            )
        return self.mpp

    def best_level_for(self, downsample: float, tolerance: float = 0.01) -> int:
        """Largest level whose downsample is <= ``downsample`` (at or above that resolution).

        Level downsamples are nominal factors with rounding noise (2.001 for a level of
        half the size of an odd-sized level 0): within ``tolerance`` a level counts as
        matching, and the tiny difference is resampled.
        """
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tolerance):
                best = i if ds >= self.level_downsamples[best] else best
        return best

    # ------------------------------------------------------------------- reads
    def read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 array (h, w, 3) of a region in level px, inside the level's bounds; it may
        be read-only (copy it to write into it)."""
        lw, lh = self.level_dimensions[level]
        assert 0 <= x and 0 <= y and x + w <= lw and y + h <= lh and w > 0 and h > 0, (
            f"region {(x, y, w, h)} outside level {level} of size {(lw, lh)}"
        )
        try:
            if self.backend == "openslide":
                page = None if self._direct is None else self._direct.pages.get(level)
                if page is not None:
                    try:
                        decode = partial(self._direct.tile, page)
                        return self._segments_read(level, page, decode, x, y, w, h)
                    except Exception:  # a tile libjpeg warns about: OpenSlide decodes or fails it, as before
                        pass
                ds = self.level_downsamples[level]
                loc = (int(round(x * ds)), int(round(y * ds)))
                return pil_on_white(self._handle.read_region(loc, level, (w, h)))
            return self._tiff_read(level, x, y, w, h)
        except SlideError:
            raise
        except Exception as exc:  # decoder errors from OpenSlide, tifffile, imagecodecs
            why = f"{type(exc).__name__}: {exc}"
            if getattr(self, "openslide_error", None):
                why = f"OpenSlide: {self.openslide_error}; tifffile: {why}"
            raise SlideError(
                self.name,
                f"pixel data could not be decoded at level {level}, region x={x} y={y} w={w} h={h} ({why})",
                "the file is damaged or truncated: re-export or re-scan it, or remove it from the sheet",
            ) from exc

    def _tiff_read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        return self._segments_read(level, page, lambda index: self._tiff_segment(page, index), x, y, w, h)

    def _tiff_segment(self, page, index: int) -> np.ndarray:
        """Strip or tile ``index`` of ``page``, decoded by tifffile and composited on white."""
        fh = self._handle.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        seg = seg[0]  # (length, width, samples)
        if seg.ndim == 2:
            seg = seg[..., None]
        return composite_on_white(seg[..., :4] if seg.shape[-1] >= 4 else seg[..., :3])

    def _segments_read(self, level: int, page, decode, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Region (x, y, w, h) of ``level`` put together from the strips or tiles of its TIFF
        ``page`` that it touches: ``decode(index)`` gives one (RGB), kept in the slide's cache."""
        if page.is_tiled:
            seg_h, seg_w = page.tilelength, page.tilewidth
        else:
            seg_h, seg_w = page.rowsperstrip or page.imagelength, page.imagewidth
        n_x = math.ceil(page.imagewidth / seg_w)
        out = np.empty((h, w, 3), np.uint8)
        for sy in range(y // seg_h, (y + h - 1) // seg_h + 1):
            for sx in range(x // seg_w, (x + w - 1) // seg_w + 1):
                index = sy * n_x + sx
                seg = self._segment_cache.get((level, index))
                if seg is None:
                    seg = decode(index)
                    self._segment_cache.put((level, index), seg)
                y0, x0 = sy * seg_h, sx * seg_w
                # intersection of the segment with the requested region, in level px
                iy0, iy1 = max(y, y0), min(y + h, y0 + seg.shape[0])
                ix0, ix1 = max(x, x0), min(x + w, x0 + seg.shape[1])
                out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = seg[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
        return out

    def thumbnail(self, downsample: float, chunk: int = 2048) -> tuple[np.ndarray, float]:
        """RGB image at about ``downsample`` level-0 px per pixel, built chunk by chunk.

        Reads the level nearest at or above that resolution and block-averages by an
        integer factor, so memory is bounded by ``chunk`` and the thumbnail size.
        Returns (image, exact level-0 px per thumbnail px).
        """
        level = self.best_level_for(downsample)
        ds = self.level_downsamples[level]
        f = max(1, int(math.floor(downsample / ds + 1e-6)))
        lw, lh = self.level_dimensions[level]
        tw, th = math.ceil(lw / f), math.ceil(lh / f)
        out = np.empty((th, tw, 3), np.uint8)
        step = max(f, (chunk // f) * f)
        for y in range(0, lh, step):
            for x in range(0, lw, step):
                w, h = min(step, lw - x), min(step, lh - y)
                region = self.read_level(level, x, y, w, h).astype(np.float32)
                pw, ph = math.ceil(w / f) * f, math.ceil(h / f) * f
                if (pw, ph) != (w, h):  # replicate the last row/column to a full block
                    region = np.pad(region, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
                block = region.reshape(ph // f, f, pw // f, f, 3).mean(axis=(1, 3))
                out[y // f : y // f + ph // f, x // f : x // f + pw // f] = np.round(block).astype(np.uint8)
        return out, ds * f

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- opening
def _check_mpp(name: str, mpp: float | None, source: str) -> float | None:
    if mpp is None:
        return None
    if not (MPP_RANGE[0] <= mpp <= MPP_RANGE[1]):
        where = "the sample sheet" if source == "sheet" else "the file's metadata"
        raise SlideError(
            name,
            f"the resolution in {where} is {mpp:g} µm/px, outside the plausible range "
            f"{MPP_RANGE[0]}-{MPP_RANGE[1]} µm/px",
            "put the correct µm per pixel of level 0 in the 'mpp' column of the sample sheet",
        )
    return float(mpp)


def _open_openslide(name: str, path: str):
    import openslide

    handle = openslide.OpenSlide(path)
    props = handle.properties
    mpp = None
    try:
        mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        mpp = (mx + my) / 2
    except (KeyError, ValueError):
        pass
    return dict(
        backend="openslide",
        vendor=props.get("openslide.vendor", "unknown"),
        level_dimensions=[tuple(d) for d in handle.level_dimensions],
        level_downsamples=[float(d) for d in handle.level_downsamples],
        mpp=mpp,
        _handle=handle,
    )


def _tiff_mpp(tiff, page) -> float | None:
    if tiff.is_ome:
        import re

        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tiff.ome_metadata or "")
        u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tiff.ome_metadata or "")
        if m:
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(u.group(1) if u else "µm")
            if scale is not None:
                return float(m.group(1)) * scale
    unit = page.tags.get("ResolutionUnit")
    xres = page.tags.get("XResolution")
    if unit is None or xres is None or int(unit.value) not in (2, 3):
        return None
    num, den = xres.value
    if not num:
        return None
    per_unit = num / den  # pixels per inch (2) or per centimetre (3)
    return (25400.0 if int(unit.value) == 2 else 10000.0) / per_unit


def _open_tifffile(name: str, path: str):
    import tifffile

    try:
        tiff = tifffile.TiffFile(path)
    except Exception as exc:
        raise SlideError(
            name,
            f"not a slide OpenSlide or tifffile can read ({type(exc).__name__}: {exc})",
            "check that the file is a whole-slide image (SVS, NDPI, MRXS, DICOM, TIFF) and "
            "not truncated; convert other formats to pyramidal OME-TIFF",
        ) from None
    series = tiff.series[0]
    page0 = series.levels[0].keyframe
    rgb = (
        series.dtype == np.uint8
        and page0.photometric == tifffile.PHOTOMETRIC.RGB
        and page0.samplesperpixel in (3, 4)
        and page0.planarconfig == tifffile.PLANARCONFIG.CONTIG
    )
    if not rgb:
        tiff.close()
        kind = (
            f"a {series.shape[0]}-channel image (axes {series.axes}, {series.dtype})"
            if "C" in series.axes or "S" in series.axes
            else f"a single-channel image (axes {series.axes}, {series.dtype})"
        )
        raise SlideError(
            name,
            f"{kind}, not an 8-bit RGB brightfield slide (multiplex fluorescence is not supported)",
            "export an 8-bit RGB rendering of the slide (e.g. from QuPath), or remove it from the sheet",
        )
    pages = [lvl.keyframe for lvl in series.levels]
    dims = [(p.imagewidth, p.imagelength) for p in pages]
    return dict(
        backend="tifffile",
        vendor="ome-tiff" if tiff.is_ome else "tiff",
        level_dimensions=dims,
        level_downsamples=[dims[0][0] / d[0] for d in dims],
        mpp=_tiff_mpp(tiff, pages[0]),
        _handle=tiff,
        _pages=pages,
    )


def open_slide(path: str, name: str | None = None, mpp: float | None = None) -> Slide:
    """Open ``path`` as a slide. ``mpp`` (from the sample sheet) overrides the metadata."""
    name = name or os.path.basename(path)
    if not os.path.exists(path):
        raise SlideError(name, f"file not found: {path}", "correct the 'path' column of the sample sheet")
    if os.path.isdir(path):
        raise SlideError(
            name,
            f"{path} is a folder",
            "point 'path' at the slide file itself (for a DICOM series, any one .dcm file of it; "
            "for MRXS, the .mrxs file next to its data folder)",
        )
    import openslide

    fmt = None
    try:
        fmt = openslide.OpenSlide.detect_format(path)
    except Exception:
        pass
    info = None
    os_error = None
    if fmt is not None:
        try:
            info = _open_openslide(name, path)
        except Exception as exc:
            os_error = f"{type(exc).__name__}: {exc}"
    if info is not None and info["vendor"] == "generic-tiff":
        # OpenSlide ignores SubIFD pyramids (OME-TIFF): prefer tifffile when it sees more levels
        try:
            alt = _open_tifffile(name, path)
            if len(alt["level_dimensions"]) > len(info["level_dimensions"]):
                info["_handle"].close()
                info = alt
            else:
                alt["_handle"].close()
        except SlideError:
            pass
    if info is None:
        if _looks_like_tiff(path):
            try:
                info = _open_tifffile(name, path)
            except SlideError as exc:
                if os_error:  # OpenSlide's reason is the more useful one
                    exc.problem = f"OpenSlide cannot read it ({os_error}); tifffile: {exc.problem}"
                    exc.args = (f"slide '{name}': {exc.problem}. Fix: {exc.fix}",)
                raise
        else:
            raise SlideError(
                name,
                "not a slide format OpenSlide or tifffile can read" + (f" ({os_error})" if os_error else ""),
                "check the file is a complete whole-slide image (SVS, NDPI, MRXS, DICOM, SCN, TIFF) "
                "and not a placeholder or a channel-set file such as .ndpis; re-export it otherwise",
            )
    source = "metadata" if info["mpp"] is not None else "missing"
    meta_mpp = info["mpp"]
    if mpp is not None and not (isinstance(mpp, float) and math.isnan(mpp)):
        info["mpp"], source = float(mpp), "sheet"
    if info["backend"] == "openslide":
        from .jpeg_tiles import DIRECT_CACHE_BYTES, DirectLevels

        cache = _SegmentCache(DIRECT_CACHE_BYTES)
        info["_direct"] = DirectLevels.open(path, info)
    else:
        cache = _SegmentCache()
    slide = Slide(name=name, path=path, mpp_source=source, _segment_cache=cache, **info)
    slide.metadata_mpp = meta_mpp
    slide.openslide_error = os_error
    return slide


def _looks_like_tiff(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


_COPY_AGAIN = "copy the slide again from its source (compare its size with the original's)"


def _tiff_truncation(path: str, size: int) -> str | None:
    """Why a TIFF-based file (SVS, NDPI, SCN, TIFF, ...) looks cut short, or None: its image
    directories or image data reach past its end, as an interrupted copy leaves it."""
    import logging
    import struct

    import tifffile

    with open(path, "rb") as fh:
        head = fh.read(16)
    order = "<" if head[:2] == b"II" else ">"
    big = struct.unpack(order + "H", head[2:4])[0] == 43
    first = struct.unpack(order + ("Q" if big else "I"), head[8:16] if big else head[4:8])[0]
    if first >= size:
        return f"the file has {size} bytes but its first image directory is at byte {first}"
    said = []

    class Said(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    handler, tlog = Said(), logging.getLogger("tifffile")
    tlog.addHandler(handler)
    propagate, tlog.propagate = tlog.propagate, False  # what it says is in our message
    try:
        with tifffile.TiffFile(path) as tif:
            end = 0
            for page in tif.pages:
                for off, n in zip(page.dataoffsets, page.databytecounts, strict=False):
                    if off and off + n > end:
                        end = off + n
    except Exception:
        return None  # not parseable at all: opening it says so
    finally:
        tlog.removeHandler(handler)
        tlog.propagate = propagate
    beyond = [m for m in said if "invalid" in m and "offset" in m]
    if beyond:
        return f"the file has {size} bytes and an image directory beyond that ({beyond[0].split('> ')[-1]})"
    if end > size:
        return f"the file has {size} bytes but its image data runs to byte {end}"
    return None


def check_complete(path: str, name: str) -> None:
    """Empty and truncated slide files, named as such (an interrupted copy or download)."""
    from .content import slide_files

    if not os.path.isfile(path):
        return  # open_slide says what is wrong
    for f in slide_files(path):
        if os.path.getsize(f) == 0:
            what = "the file" if f == path else f"{os.path.basename(f)}, a file of the slide,"
            raise SlideError(name, f"{what} is empty (0 bytes): {f}", _COPY_AGAIN)
    if _looks_like_tiff(path):
        why = _tiff_truncation(path, os.path.getsize(path))
        if why:
            raise SlideError(name, f"the file is truncated: {why}; {path}", _COPY_AGAIN)


def inspect_slide(path: str, name: str, mpp: float | None = None) -> dict:
    """Open the slide, check it is whole, has an mpp and that its pixels decode.

    Returns the slide's description. Raises :class:`SlideError` for bad input.
    """
    check_complete(path, name)
    with open_slide(path, name, mpp) as slide:
        # decode a small region of the lowest-resolution level (cheap, catches corrupt files)
        lvl = slide.level_count - 1
        lw, lh = slide.level_dimensions[lvl]
        w, h = min(lw, 512), min(lh, 512)
        slide.read_level(lvl, (lw - w) // 2, (lh - h) // 2, w, h)
        slide.require_mpp()
        warnings = []
        if slide.mpp_source == "sheet" and slide.metadata_mpp and abs(slide.mpp / slide.metadata_mpp - 1) > 0.05:
            warnings.append(
                f"the sheet's mpp {slide.mpp:g} overrides the file's {slide.metadata_mpp:g} µm/px "
                f"({slide.metadata_mpp / slide.mpp:.2f}x); check the sheet if that was not intended"
            )
        return dict(
            warnings=warnings,
            slide_id=name,
            path=path,
            backend=slide.backend,
            vendor=slide.vendor,
            width=slide.dimensions[0],
            height=slide.dimensions[1],
            level_count=slide.level_count,
            level_dimensions=slide.level_dimensions,
            level_downsamples=slide.level_downsamples,
            mpp=slide.mpp,
            mpp_source=slide.mpp_source,
            metadata_mpp=slide.metadata_mpp,
        )
