"""JPEG tiles of an SVS or generic tiled TIFF, decoded as OpenSlide decodes them, without OpenSlide.

OpenSlide's ``read_region`` decodes each JPEG tile with libjpeg-turbo (cached), then paints the
tiles onto a cairo surface and converts its premultiplied ARGB for Python: on a 738-px region of
CMU-1-Small-Region about 10 ms, of which the painting is most even when every tile is in its
cache. :class:`DirectLevels` reads the same tiles' bytes with tifffile and decodes them with
libjpeg-turbo through simplejpeg: about 1.5 ms for the same region, the same pixels
(tests/test_slide.py, benchmarks/README.md).

The same pixels, by construction:

- **the decoder's settings are OpenSlide's**: the tile's stream after the level's JPEG tables,
  the accurate integer DCT and fancy upsampling (libjpeg's defaults), and the colour space that
  the TIFF's photometric tag names (OpenSlide sets ``jpeg_color_space`` from it: YCbCr for
  YCbCr, else RGB, whatever the stream's markers say). simplejpeg lets libjpeg guess the colour
  space from the stream, so :func:`jpeg_stream` rewrites the stream to make libjpeg's guess
  the tag's: the JFIF and Adobe markers dropped, the components numbered 1, 2, 3 (YCbCr) or
  'R', 'G', 'B' (RGB). Aperio writes RGB JPEG tiles whose components are numbered 0, 1, 2,
  which libjpeg would take for YCbCr;
- **a tile libjpeg warns about is not decoded here**: OpenSlide fails a read on libjpeg's
  warnings (corrupt data, a premature end), where libjpeg itself would fill in what it could.
  simplejpeg's strict mode raises on any warning, and the caller then reads the region with
  OpenSlide, which decodes or fails it as before, with its own message.

Only levels where that holds are read here (:meth:`DirectLevels.open`); the rest stay OpenSlide's.
"""

from __future__ import annotations

import numpy as np

#: decoded tiles kept per slide handle (the slide's segment cache, which puts a region together
#: from them): neighbouring windows share tiles (a 736-px window of 240-px tiles shares one or
#: two tile columns with the next); 64 MB holds about 370 such tiles, a row of windows across a
#: 20x slide about 22,000 px wide
DIRECT_CACHE_BYTES = 64 << 20

_SOI, _EOI, _SOS = b"\xff\xd8", b"\xff\xd9", b"\xff\xda"
_SOF_SEQUENTIAL = (0xC0, 0xC1)  # baseline and extended sequential Huffman: one scan per tile here
_DROPPED = (0xE0, 0xEE)  # APP0 (JFIF) and APP14 (Adobe): they would override the colour space
_IDS = {True: (1, 2, 3), False: (82, 71, 66)}  # ycbcr -> the component ids libjpeg reads as it


def jpeg_stream(tables: bytes | None, data: bytes, ycbcr: bool) -> bytes:
    """One tile's JPEG stream as libjpeg decodes it in OpenSlide's colour space: the TIFF's
    JPEG tables (``tables``, None for none) spliced in before the tile's own segments, the JFIF
    and Adobe markers dropped, the three components renumbered for ``ycbcr`` (the photometric
    tag is YCbCr) or RGB. The entropy-coded data is kept byte for byte. ValueError for a stream
    this does not handle (not one sequential scan of three components)."""
    if data[:2] != _SOI:
        raise ValueError("tile does not start with a JPEG SOI marker")
    if tables:
        if tables[:2] != _SOI or tables[-2:] != _EOI:
            raise ValueError("JPEG tables are not an SOI ... EOI stream")
        data = tables[:-2] + data[2:]
    ids = _IDS[ycbcr]
    out, renumber, i, n = [_SOI], {}, 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise ValueError(f"no JPEG marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = bytearray(data[i : i + 2 + length])
        if marker in _SOF_SEQUENTIAL:
            if segment[9] != 3:
                raise ValueError(f"{segment[9]} components, not 3")
            for k in range(3):
                renumber[segment[10 + 3 * k]] = ids[k]
                segment[10 + 3 * k] = ids[k]
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            raise ValueError(f"JPEG frame type 0x{marker:02X} (not sequential Huffman)")
        elif marker == 0xDA:
            if not renumber:
                raise ValueError("scan before frame header")
            for k in range(segment[4]):
                segment[5 + 2 * k] = renumber[segment[5 + 2 * k]]
            rest = data[i + 2 + length :]
            if _SOS in rest:  # entropy-coded data has no 0xFF 0xDA: a second scan
                raise ValueError("more than one scan")
            out += [bytes(segment), rest]
            return b"".join(out)
        if marker not in _DROPPED:
            out.append(bytes(segment))
        i += 2 + length
    raise ValueError("no scan in the JPEG stream")


class DirectLevels:
    """The pyramid levels of a slide OpenSlide opened whose JPEG tiles are read and decoded here
    (module docstring); :meth:`open` says which (``pages``: level -> its TIFF page). :meth:`tile`
    decodes one tile and raises on any problem (a tile libjpeg warns about, an unreadable file):
    the slide (:meth:`wsiseg.slide.Slide.read_level`) then reads the region with OpenSlide."""

    def __init__(self, tiff, pages: dict):
        self.tiff, self.pages = tiff, pages

    @classmethod
    def open(cls, path: str, info: dict) -> DirectLevels | None:
        """For a slide OpenSlide opened (``info``: vendor, level sizes and downsamples): the levels
        read here, or None. An Aperio SVS or a generic tiled TIFF whose pyramid tifffile sees with
        OpenSlide's level sizes; a level qualifies when its tiles are 8-bit JPEG in RGB or YCbCr
        (3 samples, interleaved), every tile is present (OpenSlide draws a missing tile
        transparent) and its downsample is an integer (OpenSlide takes a region's origin in
        level-0 px: at a downsample such as 2.001 it places the level's px a fraction of a px
        from ours and interpolates them). None also when simplejpeg is not installed."""
        if info["vendor"] not in ("aperio", "generic-tiff"):
            return None
        try:
            import simplejpeg  # noqa: F401
            import tifffile

            tiff = tifffile.TiffFile(path)
        except Exception:
            return None
        try:
            pages = [lvl.keyframe for lvl in tiff.series[0].levels]
        except Exception:
            tiff.close()
            return None
        direct = {}
        if [(p.imagewidth, p.imagelength) for p in pages] == [tuple(d) for d in info["level_dimensions"]]:
            rgb, ycbcr = tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR
            for level, (page, ds) in enumerate(zip(pages, info["level_downsamples"])):
                if (
                    ds == round(ds)
                    and page.is_tiled
                    and int(page.compression) == 7
                    and page.photometric in (rgb, ycbcr)
                    and page.dtype == np.uint8
                    and page.samplesperpixel == 3
                    and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
                    and min(page.databytecounts) > 0
                ):
                    direct[level] = page
        if not direct:
            tiff.close()
            return None
        return cls(tiff, direct)

    @property
    def levels(self) -> list:
        return sorted(self.pages)

    def tile(self, page, index: int) -> np.ndarray:
        """Tile ``index`` of ``page`` (one of :attr:`pages`), RGB uint8 (tile length, width, 3)."""
        import simplejpeg
        import tifffile

        fh = self.tiff.filehandle
        fh.seek(page.dataoffsets[index])
        data = fh.read(page.databytecounts[index])
        stream = jpeg_stream(page.jpegtables, data, page.photometric == tifffile.PHOTOMETRIC.YCBCR)
        seg = simplejpeg.decode_jpeg(stream, "RGB", fastdct=False, fastupsample=False, strict=True)
        if seg.shape != (page.tilelength, page.tilewidth, 3):
            raise ValueError(f"tile {index} decoded to {seg.shape}, not {(page.tilelength, page.tilewidth, 3)}")
        return seg

    def close(self) -> None:
        self.tiff.close()
