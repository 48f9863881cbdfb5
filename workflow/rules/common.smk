import json
import os
import sys

import pandas as pd
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from wsiseg.sheet import SheetError, check_sheet, read_sheet, slides_from_dir  # noqa: E402

MODEL = config["model"]["name"]
RESULTS = f"{config['results']}/{MODEL}"
LOGS = f"logs/{MODEL}"
BENCH = f"benchmarks/{MODEL}"


def load_slides():
    try:
        if config.get("slides_dir"):
            sheet = slides_from_dir(config["slides_dir"], config.get("slides_glob", "*"))
        else:
            sheet = read_sheet(config["slides"])
        sheet = check_sheet(sheet)
    except SheetError as exc:
        raise WorkflowError(str(exc))
    validate(sheet, schema="../schemas/slides.schema.yaml")
    return sheet


SLIDES = load_slides()


wildcard_constraints:
    slide="[A-Za-z0-9][A-Za-z0-9._-]*",


# ------------------------------------------------------------ input functions
EXAMPLE_SLIDE = "resources/example/synthetic_he.tif"


def get_slide_path(wildcards):
    return SLIDES.loc[wildcards.slide, "path"]


def get_inspect_input(wildcards):
    """The slide file, if it exists (or a rule makes it). A missing file is not a DAG
    error that stops the archive: inspect records it as a failed slide."""
    path = get_slide_path(wildcards)
    return [path] if os.path.exists(path) or os.path.normpath(path) == EXAMPLE_SLIDE else []


def get_slide_mpp(wildcards):
    mpp = SLIDES.loc[wildcards.slide, "mpp"]
    return None if pd.isna(mpp) else float(mpp)


def get_model_weights(wildcards=None):
    return config["model"]["weights"]


def model_cfg():
    return dict(config["model"])


def segment_resources_gpu():
    return 1 if config.get("device", "auto") in ("cuda", "gpu") else 0


def triaged():
    """Slide status table from the 'triage' checkpoint (one checkpoint for the whole
    archive, so all slides are inspected in parallel)."""
    path = checkpoints.triage.get().output[0]
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False).set_index("slide_id")


def ok_slides():
    t = triaged()
    return [s for s in SLIDES.index if t.loc[s, "status"] == "ok"]


def get_stats(wildcards):
    return expand(f"{RESULTS}/{{slide}}/stats.csv", slide=ok_slides())


def get_failed(wildcards):
    t = triaged()
    return [f"{RESULTS}/{s}/slide.json" for s in SLIDES.index if t.loc[s, "status"] != "ok"]


def get_final_outputs(wildcards):
    ok = ok_slides()
    per_slide = ["mask.ome.tif", "tissue.png", "overlay.png", "stats.csv"]
    return [f"{RESULTS}/summary.csv"] + [f"{RESULTS}/{s}/{f}" for s in ok for f in per_slide]


onsuccess:
    failed = []
    for s in SLIDES.index:
        p = f"{RESULTS}/{s}/slide.json"
        if os.path.exists(p):
            with open(p) as fh:
                info = json.load(fh)
            if info.get("status") != "ok":
                failed.append(f"  {s}: {info.get('error')}")
    if failed:
        print(f"WARNING: {len(failed)} slide(s) could not be processed (see {RESULTS}/summary.csv):", file=sys.stderr)
        print("\n".join(failed), file=sys.stderr)
