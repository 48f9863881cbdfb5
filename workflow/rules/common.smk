import json
import os
import re
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

MODEL = config["model"]["name"]
RESULTS = f"{config['results']}/{MODEL}"
LOGS = f"logs/{MODEL}"
BENCH = f"benchmarks/{MODEL}"
SLIDE_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def sanitise_slide_id(name):
    """File name -> slide_id: letters, digits, '.', '_', '-' only."""
    stem = re.sub(r"\.(svs|ndpi|mrxs|tiff?|dcm|scn|bif|vms|vmu|svslide|qptiff|ome\.tiff?)$", "", name, flags=re.I)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return stem or "slide"


def slides_from_dir(folder, pattern):
    rows = []
    dicom_dirs = set()
    for p in sorted(Path(folder).glob(pattern)):
        if not p.is_file():
            continue
        if p.suffix.lower() == ".dcm":  # a DICOM series is one slide: its folder
            if p.parent in dicom_dirs:
                continue
            dicom_dirs.add(p.parent)
            rows.append(dict(slide_id=sanitise_slide_id(p.parent.name), path=str(p)))
        else:
            rows.append(dict(slide_id=sanitise_slide_id(p.name), path=str(p)))
    if not rows:
        raise WorkflowError(f"slides_dir: no file under {folder!r} matches slides_glob {pattern!r}")
    return pd.DataFrame(rows)


def load_slides():
    if config.get("slides_dir"):
        sheet = slides_from_dir(config["slides_dir"], config.get("slides_glob", "*"))
    else:
        sheet = pd.read_csv(config["slides"], sep="\t", dtype={"slide_id": str, "path": str}, comment="#")
    if "mpp" not in sheet.columns:
        sheet["mpp"] = float("nan")
    sheet["mpp"] = pd.to_numeric(sheet["mpp"], errors="coerce")
    validate(sheet, schema="../schemas/slides.schema.yaml")
    bad = [s for s in sheet["slide_id"] if not SLIDE_ID_OK.match(s)]
    if bad:
        raise WorkflowError(f"slide_id {bad} in the sample sheet: use only letters, digits, '.', '_' and '-'")
    dup = sheet["slide_id"][sheet["slide_id"].duplicated()].tolist()
    if dup:
        raise WorkflowError(
            f"slide_id {sorted(set(dup))} appears more than once; "
            "give each slide a unique slide_id (with slides_dir: rename one of the files)"
        )
    return sheet.set_index("slide_id", drop=False)


SLIDES = load_slides()


wildcard_constraints:
    slide="[A-Za-z0-9][A-Za-z0-9._-]*",


# ------------------------------------------------------------ input functions
def get_slide_path(wildcards):
    return SLIDES.loc[wildcards.slide, "path"]


def get_slide_mpp(wildcards):
    mpp = SLIDES.loc[wildcards.slide, "mpp"]
    return None if pd.isna(mpp) else float(mpp)


def get_model_weights(wildcards=None):
    return config["model"]["weights"]


def model_cfg():
    return dict(config["model"])


def segment_resources_gpu():
    return 1 if config.get("device", "auto") in ("cuda", "gpu") else 0


def slide_status(slide):
    """Read the inspect checkpoint's verdict for one slide."""
    with open(checkpoints.inspect.get(slide=slide).output[0]) as fh:
        return json.load(fh)


def ok_slides():
    return [s for s in SLIDES.index if slide_status(s)["status"] == "ok"]


def get_stats(wildcards):
    return expand(f"{RESULTS}/{{slide}}/stats.csv", slide=ok_slides())


def get_failed(wildcards):
    return [checkpoints.inspect.get(slide=s).output[0] for s in SLIDES.index if slide_status(s)["status"] != "ok"]


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
