import numpy as np
import openslide
import pytest
import tifffile
from conftest import BAD, CMU, DICOM, KIDNEY, NDPI, SMALL, TCGA, corrupt_slide, needs_data

from wsiseg.errors import SlideError
from wsiseg.slide import composite_on_white, inspect_slide, open_slide, pil_on_white

pytestmark = needs_data  # reads ../shared/data


def test_openslide_read_matches_openslide():
    with open_slide(str(CMU)) as s:
        assert s.backend == "openslide" and s.dimensions == (2220, 2967)
        assert s.mpp == pytest.approx(0.499)
        got = s.read_level(0, 1000, 1200, 64, 48)
    ref = np.asarray(openslide.OpenSlide(str(CMU)).read_region((1000, 1200), 0, (64, 48)))[..., :3]
    assert got.shape == (48, 64, 3) and np.array_equal(got, ref)


def test_pyramid_levels_read_in_level_px():
    with open_slide(str(NDPI)) as s:  # name with spaces and parentheses
        assert s.level_count == 7 and s.level_downsamples[2] == 4
        got = s.read_level(2, 100, 200, 32, 32)
    ref = np.asarray(openslide.OpenSlide(str(NDPI)).read_region((400, 800), 2, (32, 32)))[..., :3]
    assert np.array_equal(got, ref)


def test_dicom_series_opens_from_any_member():
    with open_slide(str(DICOM)) as s:
        assert s.vendor == "dicom" and s.level_count == 12 and s.dimensions == (2220, 2967)


def test_best_level_is_at_or_above_target_resolution():
    with open_slide(str(NDPI)) as s:
        assert s.best_level_for(0.5 / s.mpp) == 1  # 2.19x wanted: level 1 (2x), never level 2 (4x)
        assert s.best_level_for(1.0) == 0
        assert s.best_level_for(100) == 6


def test_tifffile_fallback_reads_strip_tiff_region():
    with open_slide(str(KIDNEY), mpp=0.5) as s:
        assert s.backend == "tifffile" and s.dimensions == (1493, 901) and s.mpp_source == "sheet"
        got = s.read_level(0, 300, 400, 100, 50)
    ref = tifffile.imread(str(KIDNEY))[400:450, 300:400]
    assert np.array_equal(got, ref)


def test_tifffile_fallback_reads_tiled_pyramid(example_slide, tmp_path):
    # an OME-TIFF OpenSlide refuses: written with SubIFDs by tifffile
    img = np.asarray(open_slide(str(example_slide)).read_level(0, 0, 0, 600, 500))
    p = tmp_path / "x.ome.tif"
    with tifffile.TiffWriter(p, ome=True) as tif:
        tif.write(
            img,
            tile=(128, 128),
            photometric="rgb",
            metadata={"axes": "YXS", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3},
            subifds=1,
        )
        tif.write(img[::2, ::2], tile=(128, 128), photometric="rgb", subfiletype=1)
    with open_slide(str(p)) as s:
        assert s.backend == "tifffile" and s.mpp == pytest.approx(0.3)
        assert np.array_equal(s.read_level(0, 130, 250, 200, 140), img[250:390, 130:330])


BOXES = CMU.parents[1] / "openslide-python-fixtures" / "boxes.tiff"  # generic tiled TIFF, deflate tiles


def _openslide_region(path, level, x, y, w, h):
    """What read_level gave before JPEG tiles were decoded without OpenSlide."""
    o = openslide.OpenSlide(str(path))
    ds = o.level_downsamples[level]
    return pil_on_white(o.read_region((int(round(x * ds)), int(round(y * ds))), level, (w, h)))


@pytest.mark.parametrize(
    "path,direct",
    [
        (CMU, [0]),  # Aperio SVS: RGB JPEG tiles whose components are numbered 0, 1, 2
        ("example", [0, 1, 2]),  # the bundled example: generic TIFF, YCbCr JPEG subsampled 2x2
        (SMALL, [0]),
        (TCGA, []),  # JPEG 2000 tiles
        (BOXES, []),  # deflate tiles
        (NDPI, []),
        (DICOM, []),
    ],
    ids=["svs", "example-ycbcr", "svs-16px", "svs-jp2k", "generic-deflate", "ndpi", "dicom"],
)
def test_jpeg_tiles_decoded_without_openslide_give_its_pixels(path, direct, example_slide):
    """The levels whose JPEG tiles wsiseg decodes itself (wsiseg.jpeg_tiles) give OpenSlide's
    pixels to the last bit: regions inside a level, across its tiles' borders and at its right
    and bottom edges (partial tiles), on every level. Other levels and formats stay OpenSlide's."""
    path = example_slide if path == "example" else path
    with open_slide(str(path), mpp=0.5) as s:
        assert s.backend == "openslide" and s.direct_levels == direct
        for level, (lw, lh) in enumerate(s.level_dimensions):
            n = min(lw, lh, 738)
            regions = [(0, 0, lw, lh)]  # a level of a few px: the whole of it
            if n >= 16:
                regions = [
                    (0, 0, n, n),
                    ((lw - n) // 2 + 1, (lh - n) // 3, n - 1, n - 3),
                    (lw - n, lh - n, n, n),
                    (lw - 7, lh - 5, 7, 5),
                ]
            for x, y, w, h in regions:
                got = s.read_level(level, x, y, w, h)
                assert np.array_equal(got, _openslide_region(path, level, x, y, w, h)), (level, (x, y, w, h))


def test_a_damaged_jpeg_tile_is_openslides_to_fail(tmp_path):
    """A damaged JPEG tile (libjpeg warns and would fill in the rest) is not decoded by wsiseg:
    the read goes to OpenSlide, which fails it with the error a read gave before, naming the
    slide and the region; the level's other reads stay wsiseg's."""
    path = tmp_path / "damaged.tif"
    corrupt_slide(path)
    with open_slide(str(path), "damaged") as s, open_slide(str(path), "damaged") as before:
        before._direct = None  # every read OpenSlide's, as before
        assert s.direct_levels == [0, 1, 2]
        lw, lh = s.level_dimensions[1]
        with pytest.raises(SlideError) as old:
            before.read_level(1, 0, 0, lw, lh)
        with pytest.raises(SlideError) as new:
            s.read_level(1, 0, 0, lw, lh)
        assert str(new.value) == str(old.value)
        assert "slide 'damaged'" in str(new.value) and "could not be decoded at level 1" in str(new.value)
    with open_slide(str(path), "damaged") as s:  # OpenSlide's handle is left in an error state
        assert s.direct_levels == [0, 1, 2]
        assert np.array_equal(s.read_level(1, 0, 0, 200, 100), _openslide_region(path, 1, 0, 0, 200, 100))


def test_jpeg_stream_keeps_what_it_decodes_and_refuses_the_rest(tmp_path):
    """A JFIF JPEG (Pillow's, YCbCr 4:2:0) rewritten by jpeg_stream decodes to Pillow's own pixels;
    a progressive one, which jpeg_stream cannot renumber scan by scan, is refused (its level
    would be read by OpenSlide)."""
    import io

    import simplejpeg
    from PIL import Image

    from wsiseg.jpeg_tiles import jpeg_stream

    with open_slide(str(CMU)) as s:
        rgb = s.read_level(0, 600, 900, 320, 240)
    for progressive in (False, True):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=80, progressive=progressive)
        data = buf.getvalue()
        if progressive:
            with pytest.raises(ValueError, match="0xC2"):
                jpeg_stream(None, data, ycbcr=True)
            continue
        stream = jpeg_stream(None, data, ycbcr=True)
        assert b"JFIF" in data and b"JFIF" not in stream
        got = simplejpeg.decode_jpeg(stream, "RGB", fastdct=False, fastupsample=False, strict=True)
        assert np.array_equal(got, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_rgba_composited_on_white():
    rgba = np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [0, 0, 0, 128]]], np.uint8)
    out = composite_on_white(rgba)
    assert out.tolist() == [[[255, 255, 255], [255, 0, 0], [127, 127, 127]]]
    # an opaque region (the fast path) is its RGB, as the compositing formula gives it
    opaque = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    opaque[..., 3] = 255
    rgb = opaque[..., :3].astype(np.uint16)
    assert np.array_equal(composite_on_white(opaque), ((rgb * 255 + 127) // 255).astype(np.uint8))


@pytest.mark.parametrize("path", [CMU, TCGA, NDPI, DICOM], ids=["svs", "svs-jp2k", "ndpi", "dicom"])
def test_pil_rgb_equals_the_composite(path):
    # what read_level returns for OpenSlide's regions: PIL's RGB where opaque, composited where
    # not (a region over the slide's edge is transparent beyond it), the same values either way
    handle = openslide.OpenSlide(str(path))
    w, h = handle.dimensions
    seen = set()
    for x, y in [(w // 3, h // 3), (w - 700, h - 500), (-200, -100), (w - 300, 10)]:
        img = handle.read_region((x, y), 0, (736, 736))
        rgba = np.asarray(img)
        seen.add(bool(rgba[..., 3].min() == 255))
        got = pil_on_white(img)
        assert got.dtype == np.uint8 and got.shape == (736, 736, 3)
        assert np.array_equal(got, composite_on_white(rgba))
    assert seen == {True, False}  # both paths taken


def test_missing_mpp_names_slide_and_fix():
    with pytest.raises(SlideError) as e:
        inspect_slide(str(TCGA), "tcga")
    assert "tcga" in str(e.value) and "mpp" in str(e.value) and "sample sheet" in str(e.value)
    assert inspect_slide(str(TCGA), "tcga", mpp=0.25)["mpp"] == 0.25


@pytest.mark.parametrize(
    "kind,words",
    [
        ("broken", ["not a slide format"]),
        ("unreadable", ["could not be decoded", "Bogus marker"]),
        ("unopenable", ["could not be decoded", "52479"]),
        ("qptiff", ["3-channel", "RGB"]),
        ("ndpis", ["not a slide format"]),
        ("dicom_noflavor", ["image flavor"]),
    ],
)
def test_bad_inputs_get_clear_errors(kind, words):
    with pytest.raises(SlideError) as e:
        inspect_slide(str(BAD[kind]), f"bad-{kind}")
    msg = str(e.value)
    assert f"slide 'bad-{kind}'" in msg and "Fix:" in msg
    for w in words:
        assert w in msg


@pytest.mark.parametrize("fraction", [0.3, 0.9, 0.999])
def test_truncated_slide_named_as_such(tmp_path, fraction):
    """An interrupted copy of a real SVS (its directories at the end, as Aperio writes them) is
    called truncated, not 'not a slide format'."""
    data = CMU.read_bytes()
    cut = tmp_path / "case01.svs"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideError) as e:
        inspect_slide(str(cut), "case01")
    msg = str(e.value)
    assert msg.startswith("slide 'case01': the file is truncated") and f"has {cut.stat().st_size} bytes" in msg
    assert str(cut) in msg and "copy the slide again" in msg


def test_whole_slides_are_not_called_truncated(tmp_path):
    for path, mpp in ((CMU, None), (TCGA, 0.25), (NDPI, None), (DICOM, None)):
        assert inspect_slide(str(path), "s", mpp)["width"] > 0


def test_empty_slide_files_named_as_such(tmp_path):
    empty = tmp_path / "case02.ndpi"
    empty.write_bytes(b"")
    with pytest.raises(SlideError, match=r"slide 'case02': the file is empty \(0 bytes\).*Fix: copy the slide again"):
        inspect_slide(str(empty), "case02")
    series = tmp_path / "dicom"  # one empty level of a DICOM series
    series.mkdir()
    for f in DICOM.parent.iterdir():
        (series / f.name).write_bytes(b"" if f.name.startswith("level-3-") else f.read_bytes())
    with pytest.raises(SlideError, match=r"level-3-frames-0-1.dcm, a file of the slide, is empty"):
        inspect_slide(str(series / DICOM.name), "dicom")


def test_implausible_mpp_rejected_unless_sheet_fixes_it():
    boxes = BAD["broken"].parents[1] / "openslide-python-fixtures" / "boxes.tiff"
    with pytest.raises(SlideError, match="plausible"):
        inspect_slide(str(boxes), "boxes")
    assert inspect_slide(str(boxes), "boxes", mpp=0.5)["mpp"] == 0.5


def test_thumbnail_is_block_mean_of_level():
    with open_slide(str(CMU)) as s:
        th, ds = s.thumbnail(8.0, chunk=512)  # chunked, integer factor 8
        assert ds == 8 and th.shape == (371, 278, 3)
        block = s.read_level(0, 80, 160, 8, 8).astype(float).mean(axis=(0, 1))
    assert np.abs(th[20, 10].astype(float) - block).max() <= 0.5 + 1e-9


def test_strip_tiff_strip_decoded_once_for_many_reads():
    with open_slide(str(KIDNEY), mpp=0.5) as s:  # one strip holds the whole image
        a = s.read_level(0, 0, 0, 50, 50)
        assert len(s._segment_cache.items) == 1
        b = s.read_level(0, 1400, 850, 93, 51)
        assert len(s._segment_cache.items) == 1
    ref = tifffile.imread(str(KIDNEY))
    assert np.array_equal(a, ref[:50, :50]) and np.array_equal(b, ref[850:901, 1400:1493])


def test_sheet_mpp_overriding_different_metadata_is_flagged():
    info = inspect_slide(str(CMU), "cmu", mpp=0.25)
    assert info["mpp"] == 0.25 and info["mpp_source"] == "sheet" and "overrides" in info["warnings"][0]
    assert inspect_slide(str(CMU), "cmu", mpp=0.5)["warnings"] == []


@needs_data
@pytest.mark.parametrize("kind", ["good", "bad"])
def test_inspect_job_imports_no_pandas(tmp_path, kind):
    """The inspect stage runs once per slide, as a local job on the host that runs Snakemake:
    in a process of its own it imports no pandas (0.35 s of its 0.65 here), for a good slide
    (its description) and a bad one (the record that names the slide and the fix)."""
    import json
    import subprocess
    import sys

    path = CMU if kind == "good" else BAD["unopenable"]
    code = (
        "import json, logging, sys\n"
        "from wsiseg import triage\n"
        "triage.inspect(path=sys.argv[1], slide_id='s', mpp=None, out_json=sys.argv[2], log=logging.getLogger('t'))\n"
        "print('pandas' in sys.modules)\n"
    )
    out = tmp_path / "slide.json"
    res = subprocess.run([sys.executable, "-c", code, str(path), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == ["False"]
    rec = json.loads(out.read_text())
    assert rec["status"] == ("ok" if kind == "good" else "failed"), rec
    assert (rec["width"], rec["height"]) == (2220, 2967) if kind == "good" else "Fix" in rec["error"]
