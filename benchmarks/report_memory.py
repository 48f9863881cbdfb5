"""Peak memory and time of the report's two steps against the size of what they read.

report_histograms (per slide): objects.csv.gz of a growing number of objects (the columns
the stats stage writes today, plus the agreed shape columns, with random values), read in
chunks into fixed-bin histograms. report_plots (archive): summary.csv and per-slide
histograms of a growing number of slides, drawn into the four SVG figures. Each run in a
fresh process; prints peak RSS and seconds. The promise: report_histograms flat in the
number of objects (bounded by the chunk), report_plots growing with slides x bins only.

    python benchmarks/report_memory.py [--objects N ...] [--slides N ...]
        (defaults: objects 100000 1000000 4000000; slides 10 100 1000 10000)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
sys.path.insert(0, SRC)

CHILD = r"""
import json, resource, sys, time, glob
sys.path.insert(0, {src!r})
from wsiseg import report
step, a, b = sys.argv[1:4]
t0 = time.monotonic()
if step == "report_histograms":
    report.run_histograms(objects_csv=a, slide_id="bench", out_json=b, log=lambda *_: None)
else:
    out = {{k: f"{{b}}/{{k}}.svg" for k in ("slides", "sizes", "shapes", "failed")}}
    report.run_plots(summary_csv=a + "/summary.csv", histograms=sorted(glob.glob(a + "/h*.json")), out=out,
                     log=lambda *_: None)
print(json.dumps(dict(s=time.monotonic() - t0, rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
"""


def make_objects(path, n, seed=0, chunk=500_000):
    """objects.csv.gz of n random nuclei: the columns the report plots (wsiseg.report.METRICS)."""
    import gzip

    import numpy as np
    import pandas as pd

    from wsiseg.report import METRICS

    rng = np.random.default_rng(seed)
    with gzip.open(path, "wt", compresslevel=1) as fh:
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            area = rng.lognormal(3.5, 0.6, k)
            t = pd.DataFrame(
                dict(
                    slide_id="bench",
                    object_id=np.arange(start + 1, start + k + 1),
                    **{"class": "nucleus"},
                    area_um2=area.round(2),
                    equivalent_diameter_um=(2 * np.sqrt(area / np.pi)).round(2),
                    centroid_x_um=rng.random(k) * 2e4,
                    centroid_y_um=rng.random(k) * 2e4,
                )
            )
            for c in METRICS:
                if c not in t:
                    t[c] = rng.random(k).round(4)
            t.to_csv(fh, index=False, header=start == 0)


def make_archive(folder, n_slides, seed=0):
    """summary.csv and per-slide histograms (random counts) of n_slides, 5% failed."""
    import numpy as np
    import pandas as pd

    from wsiseg import report
    from wsiseg.runner import write_json

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_slides):
        sid = f"s{i:05d}"
        if i % 20 == 19:
            rows.append(
                dict(slide_id=sid, status="failed", error=f"slide '{sid}': file not found: /x/{sid}.svs. Fix: x")
            )
            continue
        rows.append(
            dict(
                slide_id=sid,
                status="ok",
                error="",
                tissue_area_mm2=rng.random() * 100 + 1,
                nucleus_count=int(rng.integers(1e3, 1e6)),
                nucleus_fraction_of_tissue=rng.random() * 0.3,
            )
        )
        metrics = {
            m.column: dict(bins=m.spec(), counts={"nucleus": rng.integers(0, 1000, m.bins).tolist()})
            for m in report.METRICS.values()
        }
        write_json(os.path.join(folder, f"h{sid}.json"), dict(slide_id=sid, objects={"nucleus": 1}, metrics=metrics))
    pd.DataFrame(rows).to_csv(os.path.join(folder, "summary.csv"), index=False)


def measure(step, a, b):
    res = subprocess.run([sys.executable, "-c", CHILD.format(src=SRC), step, a, b], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, nargs="*", default=[100_000, 1_000_000, 4_000_000])
    ap.add_argument("--slides", type=int, nargs="*", default=[10, 100, 1000, 10000])
    args = ap.parse_args()
    print("command: python benchmarks/report_memory.py " + " ".join(sys.argv[1:]))
    print(f"{'step':>18} {'size':>18} {'seconds':>8} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.objects:
            path = os.path.join(tmp, f"o{n}.csv.gz")
            make_objects(path, n)
            r = measure("report_histograms", path, os.path.join(tmp, "h.json"))
            print(f"{'report_histograms':>18} {f'{n} objects':>18} {r['s']:8.1f} {r['rss_mb']:12.0f}", flush=True)
            os.remove(path)
        for n in args.slides:
            folder = os.path.join(tmp, f"a{n}")
            os.mkdir(folder)
            make_archive(folder, n)
            r = measure("report_plots", folder, folder)
            print(f"{'report_plots':>18} {f'{n} slides':>18} {r['s']:8.1f} {r['rss_mb']:12.0f}", flush=True)


if __name__ == "__main__":
    main()
