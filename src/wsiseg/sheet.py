"""Sample sheet: which slides to process (a TSV, or a folder + glob)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pandas as pd

SLIDE_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_EXT = re.compile(r"\.(svs|ndpi|mrxs|tiff?|dcm|scn|bif|vms|vmu|svslide|qptiff|ome\.tiff?)$", re.I)


#: names the workflow writes beside the slides' folders (``<results>/<model>/``, ``logs/<model>/``): not slide ids
RESERVED_IDS = {"summary.csv", "slides.tsv", "triage.log"}


class SheetError(Exception):
    pass


def read_tsv(path: str, **kw) -> pd.DataFrame:
    """A tab-separated sheet; a line whose first non-blank character is ``#`` is a comment.
    A ``#`` anywhere else is data (pandas' ``comment="#"`` would cut a path or id there)."""
    with open(path, encoding="utf-8") as fh:
        text = "".join(line for line in fh if not line.lstrip().startswith("#"))
    return pd.read_csv(io.StringIO(text), sep="\t", **kw)


def sanitise_slide_id(name: str) -> str:
    """File name -> slide_id of letters, digits, '.', '_' and '-' (extension dropped)."""
    stem = _EXT.sub("", name.strip())
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return stem or "slide"


def slides_from_dir(folder: str, pattern: str = "*") -> pd.DataFrame:
    """One row per slide under ``folder`` matching ``pattern`` (``**`` recurses).

    A folder of DICOM files is one slide (a DICOM WSI is a multi-file series):
    its slide_id is the folder name and its path the first .dcm file.
    """
    rows, dicom_dirs = [], set()
    for p in sorted(Path(folder).glob(pattern)):
        if not p.is_file():
            continue
        if p.suffix.lower() == ".dcm":
            if p.parent in dicom_dirs:
                continue
            dicom_dirs.add(p.parent)
            rows.append(dict(slide_id=sanitise_slide_id(p.parent.name), path=str(p)))
        else:
            rows.append(dict(slide_id=sanitise_slide_id(p.name), path=str(p)))
    if not rows:
        raise SheetError(f"slides_dir: no file under {folder!r} matches slides_glob {pattern!r}")
    return pd.DataFrame(rows)


def read_sheet(path: str) -> pd.DataFrame:
    sheet = read_tsv(path, dtype={"slide_id": str, "path": str})
    missing = {"slide_id", "path"} - set(sheet.columns)
    if missing:
        raise SheetError(
            f"sample sheet {path} lacks column(s) {sorted(missing)}; "
            "it needs slide_id, path and optionally mpp (tab-separated)"
        )
    return sheet


def check_sheet(sheet: pd.DataFrame) -> pd.DataFrame:
    """Normalise and check: unique, safe slide ids; mpp numeric or empty."""
    sheet = sheet.copy()
    if "mpp" not in sheet.columns:
        sheet["mpp"] = float("nan")
    sheet["mpp"] = pd.to_numeric(sheet["mpp"], errors="coerce")
    bad = [s for s in sheet["slide_id"] if not isinstance(s, str) or not SLIDE_ID_OK.match(s)]
    if bad:
        raise SheetError(f"slide_id {bad} in the sample sheet: use only letters, digits, '.', '_' and '-'")
    reserved = sorted(set(sheet["slide_id"]) & RESERVED_IDS)
    if reserved:
        raise SheetError(
            f"slide_id {reserved} in the sample sheet is a name the workflow writes in the results "
            f"folder ({', '.join(sorted(RESERVED_IDS))}); rename the slide"
        )
    dup = sorted(set(sheet["slide_id"][sheet["slide_id"].duplicated()]))
    if dup:
        clash = sheet[sheet["slide_id"].isin(dup)][["slide_id", "path"]].to_string(index=False)
        raise SheetError(
            f"slide_id {dup} appears more than once; give each slide a unique slide_id "
            f"(with slides_dir: rename one of the files):\n{clash}"
        )
    return sheet.set_index("slide_id", drop=False)
