"""Time of the rule `report_plots` (wsiseg.report.run_plots: the report's four SVG figures),
this tree's src/ against another revision's, side by side.

Cases: one slide (``--results``: a finished run's summary.csv and histograms, e.g.
results/nuclei-unet of the README example; without it, a synthetic slide of 3,000 nuclei),
and archives of N slides made from it (each slide's histograms the template's, counts
resampled; every 20th slide failed with one of the messages inspection gives, ids of 9 to
33 characters). Each run in a fresh process, the revisions alternating, ``--reps`` rounds:
prints the min and median of run_plots' seconds and CPU seconds (steadier on a shared machine),
and of the whole process's seconds (Python start and imports included, as the rule's job runs it).

    python benchmarks/report_plots.py [--before REV] [--results DIR] [--reps 3] [--keep DIR] [N ...]
        (defaults: --before HEAD, N 30 200; the one-slide case always runs)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import glob, json, sys, time
t0 = time.monotonic()
src, case, out = sys.argv[1:4]
sys.path.insert(0, src)
from wsiseg import report
t1, c1 = time.monotonic(), time.process_time()
paths = {k: f"{out}/{k}.svg" for k in ("slides", "sizes", "shapes", "failed")}
report.run_plots(summary_csv=case + "/summary.csv", histograms=sorted(glob.glob(case + "/h/*.json")), out=paths,
                 log=lambda *_: None)
print(json.dumps(dict(imports=t1 - t0, run=time.monotonic() - t1, cpu=time.process_time() - c1)))
"""

FAILURES = (
    ("file not found: /archive/{sid}.svs", "correct the 'path' column of the sample sheet"),
    ("the file has no resolution (mpp) in its metadata", "add the µm per pixel of level 0 in the 'mpp' column"),
    (
        "not a slide format OpenSlide or tifffile can read (OpenSlideUnsupportedFormatError: unsupported format)",
        "check the file is a complete whole-slide image (SVS, NDPI, MRXS, DICOM, SCN, TIFF)",
    ),
)


def template(results):
    """(summary row, histograms) of one slide: a finished run's first ok slide, or synthetic."""
    import numpy as np
    import pandas as pd

    sys.path.insert(0, os.path.join(REPO, "src"))
    from wsiseg import report
    from wsiseg.runner import read_json

    if results:
        summary = pd.read_csv(os.path.join(results, "summary.csv"), dtype={"slide_id": str})
        row = summary[summary["status"] == "ok"].iloc[0].to_dict()
        return row, read_json(os.path.join(results, row["slide_id"], "work", "object_histograms.json"))
    rng = np.random.default_rng(0)
    n = 3000
    area = rng.lognormal(3.2, 0.5, n)
    values = dict(
        area_um2=area,
        equivalent_diameter_um=2 * np.sqrt(area / np.pi),
        perimeter_um=2 * np.sqrt(np.pi * area) * rng.uniform(1.0, 1.3, n),
        major_axis_um=2.4 * np.sqrt(area / np.pi),
        minor_axis_um=1.7 * np.sqrt(area / np.pi),
        circularity=rng.beta(8, 2, n),
        eccentricity=rng.beta(5, 3, n),
        solidity=rng.beta(20, 2, n),
        orientation_deg=rng.uniform(-90, 90, n),
        mean_hematoxylin_od=rng.lognormal(-0.3, 0.3, n),
        mean_eosin_od=rng.lognormal(-1.0, 0.3, n),
        nearest_neighbour_um=rng.lognormal(1.9, 0.4, n),
        neighbours_25um=rng.poisson(8, n),
    )
    hist = dict(
        slide_id="slide",
        objects={"nucleus": n},
        metrics={
            c: dict(bins=m.spec(), counts={"nucleus": m.histogram(values[c]).tolist()})
            for c, m in report.METRICS.items()
        },
    )
    row = dict(
        slide_id="slide",
        status="ok",
        failed_stage="",
        error="",
        tissue_area_mm2=0.62,
        nucleus_area_mm2=0.082,
        nucleus_count=n,
        nucleus_fraction_of_tissue=0.13,
        nucleus_per_mm2=n / 0.62,
    )
    return row, hist


def make_case(folder, n, row, hist, seed=0):
    """summary.csv and h/<slide>.json of n slides like the template (n == 1: the template itself)."""
    import numpy as np
    import pandas as pd

    from wsiseg.runner import write_json

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "h"))
    rows = []
    for i in range(n):
        sid = row["slide_id"] if n == 1 else f"case-{i:04d}" + "-DX1-block-A" * int(rng.integers(0, 3))
        if n > 1 and i % 20 == 19:
            problem, fix = FAILURES[(i // 20) % len(FAILURES)]
            err = f"slide '{sid}': {problem.format(sid=sid)}. Fix: {fix}"
            rows.append(dict(slide_id=sid, status="failed", failed_stage="inspect", error=err))
            continue
        scale = 1.0 if n == 1 else rng.lognormal(0, 0.5)
        r = dict(row, slide_id=sid)
        for k, v in r.items():
            if k.endswith(("_count", "_per_mm2", "_fraction_of_tissue")):
                r[k] = v * scale
        rows.append(r)
        h = dict(hist, slide_id=sid)
        h["metrics"] = {
            c: dict(
                v,
                counts={k: rng.poisson(np.asarray(x) * scale).tolist() if n > 1 else x for k, x in v["counts"].items()},
            )
            for c, v in hist["metrics"].items()
        }
        write_json(os.path.join(folder, "h", f"{sid}.json"), h)
    pd.DataFrame(rows).to_csv(os.path.join(folder, "summary.csv"), index=False)


def export_src(rev, folder):
    """src/ of git revision ``rev`` into ``folder``/src."""
    os.makedirs(folder)
    tar = subprocess.run(["git", "-C", REPO, "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=tar, check=True)
    return os.path.join(folder, "src")


def measure(src, case, out):
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-c", CHILD, src, case, out], capture_output=True, text=True)
    wall = time.monotonic() - t0
    if res.returncode:
        raise SystemExit(res.stderr)
    return dict(json.loads(res.stdout.strip().splitlines()[-1]), process=wall)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slides", type=int, nargs="*", default=[30, 200])
    ap.add_argument("--before", default="HEAD", help="git revision to compare this tree's src/ with")
    ap.add_argument("--results", help="a finished run's results/<model> folder: its first ok slide is the template")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--keep", help="write each case's figures (last round) under this folder")
    args = ap.parse_args()
    print("command: python benchmarks/report_plots.py " + " ".join(sys.argv[1:]))
    rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", args.before], capture_output=True, text=True)
    print(
        f"before: {args.before} ({rev.stdout.strip()}); after: this tree's src/; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    row, hist = template(args.results)
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {"before": export_src(args.before, os.path.join(tmp, "before")), "after": os.path.join(REPO, "src")}
        print(f"{'case':>10} {'code':>7}   run_plots s min  median   CPU s min  median   process s min  median")
        for n in [1] + args.slides:
            case = os.path.join(tmp, f"case{n}")
            make_case(case, n, row, hist)
            got = {k: [] for k in srcs}
            for _ in range(args.reps):
                for k, src in srcs.items():
                    out = os.path.join(args.keep, f"{n}-slides", k) if args.keep else os.path.join(tmp, "out", k)
                    got[k].append(measure(src, case, out))
            for k, runs in got.items():
                line = f"{f'{n} slides':>10} {k:>7}"
                for col, width in (("run", 17), ("cpu", 11), ("process", 15)):
                    v = [r[col] for r in runs]
                    line += f" {min(v):{width}.2f} {statistics.median(v):7.2f}"
                print(line, flush=True)
            ratio = statistics.median(r["run"] for r in got["after"]) / statistics.median(
                r["run"] for r in got["before"]
            )
            print(f"{f'{n} slides':>10} after/before, run_plots median: {ratio:.2f}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
