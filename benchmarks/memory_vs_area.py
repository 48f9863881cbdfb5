"""Peak memory of the stitch and stats stages against mask area.

Builds label stores of growing size (random blobs) and a slide of the same size
on the mask's grid (a JPEG-tiled TIFF at 0.5 µm/px of H&E-like tiles, read at its
level 0), then in a fresh process for each size: writes the pyramidal OME-TIFF
(stitch) and counts objects over it with their morphometrics, reading the slide
for their colour, writing the per-object table objects.csv.gz and the outlines
outlines.geojson.gz (stats, as the rule runs it by default; "stats-no-outlines" is
the same without the outlines, "stats-no-colour" without reading the slide). Prints
peak RSS per stage. The promise: flat in slide area, linear in objects.

``--speckle`` draws the worst case for the outlines instead of blobs: one object over
most of the mask, riddled with one-pixel holes (what an untrained model makes), whose
whole boundary is held until its last row of tiles.

    python benchmarks/memory_vs_area.py [--speckle] [side_px ...]      (default 4096 8192 16384 32768)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {src!r})
from wsiseg.store import TileStore
from wsiseg.mask import write_ome_tiff
stage, store, mask = sys.argv[1:4]
t0 = time.monotonic()
_ru = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = _ru.ru_utime + _ru.ru_stime  # after the imports above, as t0
if stage == "stitch":
    with TileStore(store) as st:
        write_ome_tiff(st, mask, 0.5, tile=512)
    out = {{}}
else:
    from wsiseg.objects import object_rows, write_objects  # only here: the stitch child stays as lean as the rule
    from wsiseg.stats import SlidePixels, measure
    from wsiseg.outlines import OutlineCollector, write_geojson
    from wsiseg.geometry import Geometry
    from wsiseg.slide import open_slide
    classes = ["background", "a", "b"]
    # as the stats rule with its defaults: the stats row, objects.csv.gz and outlines.geojson.gz
    col = OutlineCollector(mask + ".pieces", 2.0) if stage != "stats-no-outlines" else None
    pixels = None
    if stage != "stats-no-colour":
        slide_path = sys.argv[4]
        with open_slide(slide_path) as sl:
            geom = Geometry.for_slide(sl, 0.5)
        pixels = SlidePixels(slide_path, "bench", None, geom)
    out, counts = measure(mask, classes, 0.5, outlines=col, pixels=pixels)
    write_objects(mask + ".objects.csv.gz", object_rows(counts, classes, 0.5, 2.0, "bench"))
    if col is not None:
        write_geojson(mask + ".outlines.geojson.gz", col, counts, classes, 0.5, "bench")
# this process's own peak (VmHWM); ru_maxrss would also count the parent's memory at the fork
with open("/proc/self/status") as fh:
    hwm = [int(line.split()[1]) / 1024 for line in fh if line.startswith("VmHWM:")]
ru = resource.getrusage(resource.RUSAGE_SELF)
rss = hwm[0] if hwm else ru.ru_maxrss / 1024
cpu = ru.ru_utime + ru.ru_stime - cpu0  # CPU time: less sensitive than wall time to other load
print(json.dumps(dict(s=time.monotonic() - t0, cpu_s=cpu, rss_mb=rss, count=out.get("a_count"))))
"""


def make_store(path, side, tile=512, seed=0):
    import numpy as np

    from wsiseg.store import TileStore

    rng = np.random.default_rng(seed)
    st = TileStore.create(path, side, side, tile)
    yy, xx = np.mgrid[0:tile, 0:tile]
    for r in range(st.rows):
        for c in range(st.cols):
            t = np.zeros((tile, tile), np.uint8)
            for _ in range(40):  # blobs, some crossing tile borders
                cy, cx, rad = rng.integers(-10, tile + 10), rng.integers(-10, tile + 10), rng.integers(4, 12)
                t[(yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad] = rng.integers(1, 3)
            st.write_chunk(r, c, t)
    st.close()


def make_speckled_store(path, side, tile=512, seed=0):
    """One class-a object over 80% of the pixels, the rest one-pixel holes and gaps."""
    import numpy as np

    from wsiseg.store import TileStore

    rng = np.random.default_rng(seed)
    st = TileStore.create(path, side, side, tile)
    for r in range(st.rows):
        for c in range(st.cols):
            st.write_chunk(r, c, (rng.random((tile, tile)) < 0.8).astype(np.uint8))
    st.close()


def make_slide(path, side, tile=512, seed=0):
    """A single-level JPEG-tiled RGB TIFF of side x side px at 0.5 µm/px, tile by tile from
    8 synthetic H&E tiles (read by OpenSlide as a generic TIFF; memory: the 8 tiles)."""
    import numpy as np
    import tifffile

    from wsiseg.synthetic import make_he_image

    tiles = [make_he_image(tile, tile, 0.5, seed + i)[0] for i in range(8)]
    rng = np.random.default_rng(seed)
    n = (-(-side // tile)) ** 2
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(
            (tiles[i] for i in rng.integers(0, len(tiles), n)),
            shape=(side, side, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            photometric="rgb",
            compression="jpeg",
            resolution=(1e4 / 0.5, 1e4 / 0.5),
            resolutionunit="CENTIMETER",
        )


def main():
    speckle = "--speckle" in sys.argv[1:]
    sides = [int(a) for a in sys.argv[1:] if a != "--speckle"] or [4096, 8192, 16384, 32768]
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
    code = CHILD.format(src=os.path.abspath(src))
    rows = []
    for side in sides:
        tmp = tempfile.mkdtemp(prefix="bench-mem-")
        try:
            (make_speckled_store if speckle else make_store)(os.path.join(tmp, "store"), side)
            make_slide(os.path.join(tmp, "slide.tif"), side)
            for stage in ("stitch", "stats-no-outlines", "stats-no-colour", "stats"):
                res = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        code,
                        stage,
                        os.path.join(tmp, "store"),
                        os.path.join(tmp, "mask.ome.tif"),
                        os.path.join(tmp, "slide.tif"),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append((side, stage, r["s"], r["cpu_s"], r["rss_mb"], r["count"]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"command: python {' '.join(sys.argv)}")
    print(
        f"{'mask side px':>12} {'Mpx':>8} {'stage':>17} {'seconds':>8} {'CPU s':>8} {'peak RSS MB':>12} {'objects':>9}"
    )
    for side, stage, s, cpu, rss, count in rows:
        print(
            f"{side:>12} {side * side / 1e6:>8.0f} {stage:>17} {s:>8.1f} {cpu:>8.1f} {rss:>12.0f} "
            f"{count if count is not None else '':>9}"
        )


if __name__ == "__main__":
    main()
