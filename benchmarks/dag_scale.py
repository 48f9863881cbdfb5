"""What content-keyed reruns cost when Snakemake builds the DAG: `snakemake -n` for an
archive of N slides, time and peak memory, against the same sheet in a bare Snakefile of
touch rules (the same rules, inputs and checkpoint; no params, fingerprints, resources or
weights check).

For each N: N slide files (distinct bytes where the fingerprint reads them, at the
start, middle and end; sparse elsewhere, 64 MiB each) and one sheet, then `-n` when

- ``first run``: nothing made yet: every slide's inspect job and the triage checkpoint;
- ``all done``: every output there, with Snakemake's records of them (made with
  `snakemake --touch --forceall` over empty stand-in files): "Nothing to be done", after
  comparing every job's params, the slides' fingerprints among them. For the workflow
  twice: with the fingerprint cache the `--touch` run left (a stat per slide file), and
  without it (every slide file opened and read);
- ``after triage``: the slides inspected (slide.json and slides.tsv, recorded), nothing
  else: the DAG past the checkpoint, tissue to provenance of every slide, the summary and the report plots.

Each `snakemake -n` runs in a fresh process; peak RSS is that process's. The slide files
were just written, so they are in the page cache: on a cold network file system the
uncached fingerprinting adds that file system's latency for three reads per file.

- ``fingerprints only``: the slides' content keys alone, in one process: every file read,
  then from the cache that left.

``all done`` needs `--touch` over 8 N stand-in jobs, which takes long (9 min for N = 1000
on the shared 2-core machine), so it runs up to ``--all-done-max`` slides.

    python benchmarks/dag_scale.py [--all-done-max 1000] [N ...]        (default 1000 10000)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "src"))
SLIDE_BYTES = 64 << 20
RULES = (
    "inspect",
    "triage",
    "tissue",
    "plan",
    "segment",
    "stitch",
    "stats",
    "report_histograms",
    "provenance",
    "aggregate",
    "report_plots",
)

BARE = r"""
import pandas as pd

SLIDES = pd.read_csv(config["slides"], sep="\t", dtype=str).set_index("slide_id", drop=False)
R = config["results"]


rule all:
    input:
        lambda w: [f"{R}/summary.csv", f"{R}/report.svg"] + [f"{R}/{s}/provenance.json" for s in ok()],


rule inspect:
    input:
        lambda w: SLIDES.loc[w.slide, "path"],
    output:
        f"{R}/{{slide}}/slide.json",
    shell:
        "touch {output}"


checkpoint triage:
    input:
        expand(f"{R}/{{slide}}/slide.json", slide=SLIDES.index),
    output:
        f"{R}/slides.tsv",
    shell:
        "touch {output}"


def ok():
    t = pd.read_csv(checkpoints.triage.get().output[0], sep="\t", dtype=str).set_index("slide_id")
    return [s for s in SLIDES.index if t.loc[s, "status"] == "ok"]


rule tissue:
    input:
        lambda w: SLIDES.loc[w.slide, "path"],
        f"{R}/{{slide}}/slide.json",
    output:
        f"{R}/{{slide}}/tissue.png",
    shell:
        "touch {output}"


rule plan:
    input:
        lambda w: SLIDES.loc[w.slide, "path"],
        f"{R}/{{slide}}/tissue.png",
    output:
        f"{R}/{{slide}}/plan.tsv",
    shell:
        "touch {output}"


rule segment:
    input:
        lambda w: SLIDES.loc[w.slide, "path"],
        f"{R}/{{slide}}/plan.tsv",
    output:
        f"{R}/{{slide}}/segment.json",
    shell:
        "touch {output}"


rule stitch:
    input:
        f"{R}/{{slide}}/segment.json",
    output:
        f"{R}/{{slide}}/mask.ome.tif",
    shell:
        "touch {output}"


rule stats:
    input:
        f"{R}/{{slide}}/mask.ome.tif",
    output:
        f"{R}/{{slide}}/stats.csv",
    shell:
        "touch {output}"


rule report_histograms:
    input:
        f"{R}/{{slide}}/stats.csv",
    output:
        f"{R}/{{slide}}/object_histograms.json",
    shell:
        "touch {output}"


rule provenance:
    input:
        f"{R}/{{slide}}/object_histograms.json",
    output:
        f"{R}/{{slide}}/provenance.json",
    shell:
        "touch {output}"


rule aggregate:
    input:
        lambda w: [f"{R}/{s}/stats.csv" for s in ok()],
    output:
        f"{R}/summary.csv",
    shell:
        "touch {output}"


rule report_plots:
    input:
        f"{R}/summary.csv",
        lambda w: [f"{R}/{s}/object_histograms.json" for s in ok()],
    output:
        f"{R}/report.svg",
    shell:
        "touch {output}"
"""


def make_archive(wd, n):
    """n slide files with distinct bytes at the start, middle and end, and their sheet."""
    os.makedirs(f"{wd}/slides")
    with open(f"{wd}/slides.tsv", "w") as sheet:
        sheet.write("slide_id\tpath\tmpp\n")
        for i in range(n):
            path = f"{wd}/slides/s{i:05d}.svs"
            with open(path, "wb") as fh:
                for off in (0, SLIDE_BYTES // 2 - 8192, SLIDE_BYTES - 16384):
                    fh.seek(off)
                    fh.write(os.urandom(16384))
                fh.truncate(SLIDE_BYTES)
            sheet.write(f"s{i:05d}\t{path}\t\n")


OUTPUTS = (
    "slide.json tissue.png work/thumbnail.png work/tissue.json plan.tsv plan.json work/segment.json "
    "mask.ome.tif overlay.png work/stitch.json stats.csv objects.csv.gz outlines.geojson.gz work/stats.json "
    "work/object_histograms.json provenance.json"
).split()
PLOTS = ("slides", "object_sizes", "object_shapes", "failed_slides")
ARCHIVE_OUTPUTS = ["summary.csv"] + [f"report/{f}.svg" for f in PLOTS]
BARE_OUTPUTS = (
    "slide.json tissue.png plan.tsv segment.json mask.ome.tif stats.csv object_histograms.json provenance.json"
).split()
BARE_ARCHIVE_OUTPUTS = ["summary.csv", "report.svg"]


def stand_ins(results, sheet, names, archive_names):
    """Empty stand-ins for every slide's outputs; slide.json and slides.tsv as inspect and
    triage leave them for good slides (the workflow's resource requests read them)."""
    ids = [line.split("\t")[0] for line in open(sheet).read().splitlines()[1:]]
    for s in ids:
        for name in names:
            os.makedirs(os.path.dirname(f"{results}/{s}/{name}"), exist_ok=True)
            open(f"{results}/{s}/{name}", "w").close()
        info = dict(slide_id=s, path=f"slides/{s}.svs", status="ok", error="", vendor="aperio", width=100000)
        info.update(height=80000, level_count=4, mpp=0.25, mpp_source="metadata", warnings=[], fingerprint="")
        with open(f"{results}/{s}/slide.json", "w") as fh:
            json.dump(info, fh)
    with open(f"{results}/slides.tsv", "w") as fh:
        fh.write("slide_id\tstatus\terror\tpath\n" + "".join(f"{s}\tok\t\tslides/{s}.svs\n" for s in ids))
    for name in archive_names:
        os.makedirs(os.path.dirname(f"{results}/{name}"), exist_ok=True)
        open(f"{results}/{name}", "w").close()
    return ids


def remove_all_but_inspection(results, ids, names, archive_names):
    for s in ids:
        for name in names:
            if name != "slide.json":
                os.remove(f"{results}/{s}/{name}")
    for name in archive_names:
        os.remove(f"{results}/{name}")


# --touch waits 0.1 s per job before touching (for file systems with coarse mtimes): too long for
# 60,000 stand-in jobs, and nothing is measured in that run
TOUCH = (
    "import sys, snakemake.executors.touch as t; t.Executor.SLEEPING_TIME = 0; from snakemake.cli import main; main()"
)


def touch_all(wd, snakefile, configfile):
    cmd = [sys.executable, "-c", TOUCH, "-s", snakefile, "--directory", wd, "--configfile", configfile]
    res = subprocess.run(cmd + ["--touch", "--forceall", "--cores", "1"], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stdout[-3000:] + res.stderr[-3000:])


def dry_run(wd, snakefile, configfile):
    """(seconds, peak RSS MB, jobs) of `snakemake -n` in a fresh process."""
    child = (
        "import json, resource, subprocess, sys, time\n"
        "t0 = time.monotonic()\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "dt = time.monotonic() - t0\n"
        "print(json.dumps(dict(s=dt, rss=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
        "rc=r.returncode, out=r.stdout[-3000:], err=r.stderr[-3000:])))\n"
    )
    cmd = [sys.executable, "-c", child, sys.executable, "-m", "snakemake", "-s", snakefile, "--directory", wd]
    cmd += ["--configfile", configfile, "-n", "--cores", "1", "--quiet", "rules"]
    d = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    if d["rc"] != 0:
        raise RuntimeError(d["out"] + d["err"])
    said = (d["out"] + d["err"]).split("Job stats:")  # a dry run prints the table twice
    table = said[-1].split("total")[0] if len(said) > 1 else ""
    jobs = sum(int(f[1]) for f in (line.split() for line in table.splitlines()) if len(f) == 2 and f[0] in RULES)
    return d["s"], d["rss"], jobs


def fingerprint_cost(wd, n):
    """(seconds, -, -) of the slides' content keys alone, in this process: every file read
    (no cache), then from the cache that left (a stat per file)."""
    from wsiseg.content import KeyCache

    paths = [f"{wd}/slides/s{i:05d}.svs" for i in range(n)]
    out = []
    for _ in ("no cache", "cached"):
        cache = KeyCache(f"{wd}/keys.tsv")
        t0 = time.monotonic()
        for p in paths:
            cache.slide_fingerprint(p)
        out.append(time.monotonic() - t0)
        cache.save()
    return out


def main(sizes, all_done_max):
    import yaml

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from e2e import CLASSES, tiny_model

    rows = []
    for n in sizes:
        wd = tempfile.mkdtemp(prefix=f"dag-scale-{n}-")
        try:
            make_archive(wd, n)
            cold, warm = fingerprint_cost(wd, n)
            rows.append((n, "-", "fingerprints only, no cache", cold, 0, 0))
            rows.append((n, "-", "fingerprints only, cached", warm, 0, 0))
            tiny_model(f"{wd}/tiny.pt")
            cfg = yaml.safe_load(open(os.path.join(REPO, "config", "config.yaml")))
            cfg.update(slides=f"{wd}/slides.tsv", results=f"{wd}/results", device="cpu")
            cfg["model"] = dict(name="m", weights=f"{wd}/tiny.pt", classes=CLASSES, mpp=0.5)
            with open(f"{wd}/config.yaml", "w") as fh:
                yaml.safe_dump(cfg, fh)
            bare = f"{wd}/bare/Snakefile"
            os.makedirs(os.path.dirname(bare))
            with open(bare, "w") as fh:
                fh.write(BARE)
            with open(f"{wd}/bare.yaml", "w") as fh:
                yaml.safe_dump(dict(slides=f"{wd}/slides.tsv", results=f"{wd}/bare-results"), fh)
            ours, ours_cfg, bare_cfg = os.path.join(REPO, "Snakefile"), f"{wd}/config.yaml", f"{wd}/bare.yaml"
            res, bare_res = f"{wd}/results/m", f"{wd}/bare-results"
            rows.append((n, "first run", "wsiseg", *dry_run(wd, ours, ours_cfg)))
            rows.append((n, "first run", "bare touch rules", *dry_run(wd, bare, bare_cfg)))
            ids = stand_ins(res, f"{wd}/slides.tsv", OUTPUTS, ARCHIVE_OUTPUTS)
            stand_ins(bare_res, f"{wd}/slides.tsv", BARE_OUTPUTS, BARE_ARCHIVE_OUTPUTS)
            if n <= all_done_max:  # --touch of 8 N stand-in jobs takes long (9 min for N = 1000, shared 2 cores)
                touch_all(wd, ours, ours_cfg)
                touch_all(wd, bare, bare_cfg)
                rows.append((n, "all done", "wsiseg, cached", *dry_run(wd, ours, ours_cfg)))
                os.remove(f"{wd}/.snakemake/wsiseg/content-keys.tsv")
                rows.append((n, "all done", "wsiseg, no cache", *dry_run(wd, ours, ours_cfg)))
                rows.append((n, "all done", "bare touch rules", *dry_run(wd, bare, bare_cfg)))
            remove_all_but_inspection(res, ids, OUTPUTS, ARCHIVE_OUTPUTS)
            remove_all_but_inspection(bare_res, ids, BARE_OUTPUTS, BARE_ARCHIVE_OUTPUTS)
            rows.append((n, "after triage", "wsiseg", *dry_run(wd, ours, ours_cfg)))
            rows.append((n, "after triage", "bare touch rules", *dry_run(wd, bare, bare_cfg)))
        finally:
            shutil.rmtree(wd, ignore_errors=True)
        print_table(rows)
    return rows


def print_table(rows):
    print(f"command: python benchmarks/dag_scale.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"{'slides':>7} {'DAG':>14} {'what':>28} {'jobs':>7} {'seconds':>8} {'ms/slide':>9} {'peak RSS MB':>12}")
    for n, dag, what, s, rss, jobs in rows:
        print(
            f"{n:>7} {dag:>14} {what:>28} {jobs:>7} {s:>8.1f} {1000 * s / n:>9.2f} {(f'{rss:.0f}' if rss else '-'):>12}"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[1000, 10000])
    ap.add_argument("--all-done-max", type=int, default=1000, help="largest N for the 'all done' rows")
    a = ap.parse_args()
    main(a.sizes, a.all_done_max)
