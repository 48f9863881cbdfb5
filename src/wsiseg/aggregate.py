"""Aggregate: summary.csv, one row per slide of the sheet, what happened to each.

- a slide that finished: its stats.csv row, ``status=ok``, and a ``warning`` when
  something deserves a look (no tissue found, unreadable tiles left as background,
  the sheet's mpp overriding the file's);
- a slide that could not be read (its slide.json): ``status=failed``,
  ``failed_stage=inspect`` and the ``error`` (reason and fix);
- a slide that failed in a later stage (its :class:`~wsiseg.failure.FailureRecord`):
  ``status=failed`` with that stage and error, or ``status=incomplete`` when the run
  ended before the slide's turn.

The rule ``aggregate`` writes it when every slide finished or was refused at
inspection; after failed jobs the workflow's ``onerror`` handler writes it with the
same code (:func:`run` with ``failures``), so the finished slides are never held back
by a bad one.
"""

from __future__ import annotations

import contextlib
import os

import pandas as pd

from .failure import FailureRecord
from .triage import SlideRecord

FIRST = ["slide_id", "path", "status", "failed_stage", "error", "warning"]
NO_TISSUE = (
    "no tissue found: the mask is empty (check tissue.png and overlay.png; tissue.method: all segments the whole slide)"
)


def warnings_of(row: dict, record: SlideRecord) -> str:
    """The ``warning`` cell of a finished slide: what deserves a look, '; '-separated."""
    said = list(record.warnings)
    if float(row.get("tissue_area_mm2", 1) or 0) <= 0:
        said.append(NO_TISSUE)
    n = int(row.get("tiles_unreadable", 0) or 0)
    if n:
        said.append(f"{n} unreadable tile(s) left as background (positions in logs/segment.log)")
    return "; ".join(said)


def run(*, stats_csvs: list, slide_jsons: list, failures=(), out_csv: str, log=print) -> pd.DataFrame:
    """summary.csv from the finished slides' stats.csv, every slide's slide.json and the
    failure records of slides that did not finish (``failures``: FailureRecord)."""
    records = [SlideRecord.read(p) for p in slide_jsons]
    failed = {f.slide_id: f for f in failures}
    stats = {}
    for p in stats_csvs:
        frame = pd.read_csv(p)
        if len(frame):
            stats[str(frame["slide_id"].iloc[0])] = frame
    frames = []
    for rec in records:
        ident = dict(slide_id=rec.slide_id, path=rec.path)
        if rec.status != "ok":
            frames.append(pd.DataFrame([dict(ident, status="failed", failed_stage="inspect", error=rec.error)]))
        elif rec.slide_id in failed:
            f = failed[rec.slide_id]
            status = "incomplete" if f.kind == "incomplete" else "failed"
            frames.append(pd.DataFrame([dict(ident, status=status, failed_stage=f.stage, error=f.error)]))
        elif rec.slide_id in stats:
            frame = stats[rec.slide_id].copy()
            frame["failed_stage"] = ""
            frame["warning"] = warnings_of(frame.iloc[0].to_dict(), rec)
            frames.append(frame)
        else:  # not reached by the rule (it waits for every slide's stats.csv)
            error = f"slide '{rec.slide_id}': no results yet. Fix: run the same command again"
            frames.append(pd.DataFrame([dict(ident, status="incomplete", failed_stage="", error=error)]))
    summary = pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame(columns=FIRST)
    ints = {c for f in stats.values() for c in f.columns if pd.api.types.is_integer_dtype(f[c])}
    for c in ints:  # counts stay counts (2220, not 2220.0) beside the empty cells of failed slides
        summary[c] = summary[c].astype("Int64")
    for c in FIRST:
        if c not in summary:
            summary[c] = ""
    summary = summary[FIRST + [c for c in summary.columns if c not in FIRST]]
    for c in ("failed_stage", "error", "warning"):
        summary[c] = summary[c].astype(object).where(summary[c].notna(), "")
    summary = summary.sort_values("slide_id", kind="stable").reset_index(drop=True)
    # whole or not at all: a full disk leaves the previous summary.csv (or none), never a cut one
    tmp = f"{out_csv}.tmp"
    try:
        summary.to_csv(tmp, index=False)
        os.replace(tmp, out_csv)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    for line in outcome(summary):
        log(line)
    return summary


def outcome(summary: pd.DataFrame) -> list:
    """What a run ends by saying: the counts, every slide that failed or did not finish with
    its stage and error (reason and fix), every warning."""
    summary = summary.assign(**{c: "" for c in FIRST if c not in summary})  # a summary.csv of an older version
    n = {s: int((summary["status"] == s).sum()) for s in ("ok", "failed", "incomplete")}
    warned = summary[(summary["status"] == "ok") & (summary["warning"].fillna("") != "")]
    lines = [
        f"{len(summary)} slides: {n['ok']} ok, {n['failed']} failed"
        + (f", {n['incomplete']} incomplete" if n["incomplete"] else "")
        + (f"; {len(warned)} with a warning" if len(warned) else "")
    ]
    for r in summary[summary["status"] != "ok"].itertuples():
        lines.append(f"{r.status.upper()} {r.slide_id} [{r.failed_stage}]: {r.error}")
    for r in warned.itertuples():
        lines.append(f"WARNING {r.slide_id}: {r.warning}")
    return lines


def read_failures(paths: list) -> list:
    """The failure records among ``paths`` (slides without one are skipped)."""
    return [f for f in (FailureRecord.find(p) for p in paths) if f is not None]
