"""Sample sheet: which slides to process (a TSV, or a folder + glob)."""

from __future__ import annotations

import csv
import io
import re
import warnings
from pathlib import Path

import pandas as pd

SLIDE_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_EXT = re.compile(r"\.(svs|ndpi|mrxs|tiff?|dcm|scn|bif|vms|vmu|svslide|qptiff|ome\.tiff?)$", re.I)


#: names the workflow writes beside the slides' folders in ``<results>/<model>/`` (compared
#: without case: macOS and Windows file systems do not tell Summary.csv from summary.csv).
#: A new archive-level output or folder adds its name here.
RESERVED_IDS = {"summary.csv", "slides.tsv", "logs", "report"}
#: column added by :func:`read_tsv`: the line of the file each row came from, as an editor numbers it
LINE = "sheet_line"


class SheetError(Exception):
    pass


def read_tsv(path: str, lines: bool = False, **kw) -> pd.DataFrame:
    """A tab-separated sheet; a line whose first non-blank character is ``#`` is a comment.
    A ``#`` anywhere else is data (pandas' ``comment="#"`` would cut a path or id there).
    Blank lines are skipped. ``lines``: add column :data:`LINE`, each row's line number in
    the file (header = line 1 when nothing precedes it; comments and blank lines counted),
    so that errors name the line the user sees; ``attrs["source"]`` is the file."""
    with open(path, encoding="utf-8-sig") as fh:
        kept = [(n, line) for n, line in enumerate(fh, 1) if line.strip() and not line.lstrip().startswith("#")]
    if kept:
        width = len(next(csv.reader([kept[0][1]], delimiter="\t")))
        for n, line in kept[1:]:
            fields = next(csv.reader([line.rstrip("\r\n")], delimiter="\t"), [])
            while len(fields) > width and not fields[-1].strip():
                fields.pop()  # trailing empty fields (spreadsheets write them) are nothing
            if len(fields) > width:
                raise SheetError(
                    f"{path} line {n}: {len(fields)} fields but the header has {width} "
                    f"({fields[width:]!r} would be lost); every line needs one tab between columns"
                )
    text = "".join(line if line.endswith("\n") else line + "\n" for _, line in kept)
    try:
        with warnings.catch_warnings():  # what it would drop are the empty trailing fields checked above
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            df = pd.read_csv(io.StringIO(text), sep="\t", index_col=False, **kw)
    except pd.errors.ParserError as exc:
        m = re.search(r"line (\d+)", str(exc))
        where = f" line {kept[int(m.group(1)) - 1][0]}" if m and int(m.group(1)) <= len(kept) else ""
        raise SheetError(
            f"{path}{where}: {str(exc).split(': ')[-1].strip()}; every line needs one tab between columns "
            "(a tab inside a path or id is not possible)"
        ) from None
    except pd.errors.EmptyDataError:
        raise SheetError(f"{path} is empty: it needs a header line (e.g. slide_id<TAB>path<TAB>mpp)") from None
    if lines:
        df[LINE] = [n for n, _ in kept[1:]]
    df.attrs["source"] = str(path)
    return df


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
    df = pd.DataFrame(rows)
    df.attrs["source"] = f"slides_dir {folder}"
    return df


def read_sheet(path: str) -> pd.DataFrame:
    sheet = read_tsv(path, lines=True, dtype={"slide_id": str, "path": str})
    missing = {"slide_id", "path"} - set(sheet.columns)
    if missing:
        raise SheetError(
            f"sample sheet {path} lacks column(s) {sorted(missing)}; "
            "it needs slide_id, path and optionally mpp (tab-separated)"
        )
    return sheet


def _row(sheet: pd.DataFrame, i: int) -> str:
    """Where row ``i`` is, as the user finds it: the sheet's line, or the file (slides_dir)."""
    sid = sheet["slide_id"].iloc[i]
    ident = f"slide_id {sid!r}" if isinstance(sid, str) and sid else "no slide_id"
    if LINE in sheet.columns:
        return f"line {sheet[LINE].iloc[i]} ({ident})"
    return f"{sheet['path'].iloc[i]} ({ident})"


def check_sheet(sheet: pd.DataFrame) -> pd.DataFrame:
    """Normalise and check: every row a unique, safe slide id that names no archive-level
    output, a path, an mpp that is a positive number or empty. Every problem is listed
    with the line of the sheet (or the file, for slides_dir) and the slide_id."""
    source = sheet.attrs.get("source", "the sample sheet")
    sheet = sheet.copy()
    if "mpp" not in sheet.columns:
        sheet["mpp"] = float("nan")
    problems = []
    mpp = pd.to_numeric(sheet["mpp"], errors="coerce")
    for i, (sid, path, raw) in enumerate(zip(sheet["slide_id"], sheet["path"], sheet["mpp"], strict=True)):
        if not isinstance(sid, str) or not sid.strip():
            problems.append(f"{_row(sheet, i)}: slide_id is empty; give the slide a unique id")
        elif not SLIDE_ID_OK.match(sid):
            problems.append(
                f"{_row(sheet, i)}: slide_id {sid!r} has characters other than letters, digits, '.', '_' and '-' "
                "(or does not start with a letter or digit); use only letters, digits, '.', '_' and '-'"
            )
        elif sid.lower() in RESERVED_IDS:
            problems.append(
                f"{_row(sheet, i)}: {sid!r} is a name the workflow writes in the results folder "
                f"({', '.join(sorted(RESERVED_IDS))}); rename the slide"
            )
        if not isinstance(path, str) or not path.strip():
            problems.append(f"{_row(sheet, i)}: path is empty; give the slide's file")
        if not pd.isna(raw) and str(raw).strip() and (pd.isna(mpp.iloc[i]) or mpp.iloc[i] <= 0):
            problems.append(
                f"{_row(sheet, i)}: mpp {raw!r} is not a positive number of µm per pixel "
                "(use a dot as decimal separator, e.g. 0.25, or leave it empty to use the file's)"
            )
    ids = sheet["slide_id"].where(sheet["slide_id"].map(lambda s: isinstance(s, str) and bool(s)))
    for sid in sorted(set(ids[ids.duplicated()].dropna())):
        rows = [i for i, s in enumerate(sheet["slide_id"]) if s == sid]
        where = ", ".join(_row(sheet, i).split(" (")[0] for i in rows)
        problems.append(
            f"slide_id {sid!r} appears more than once ({where}); give each slide a unique slide_id"
            + (" (with slides_dir: rename one of the files)" if LINE not in sheet.columns else "")
        )
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise SheetError(f"{source}: {len(problems)} problem(s):\n  " + "\n  ".join(shown))
    sheet["mpp"] = mpp
    return sheet.set_index("slide_id", drop=False)
