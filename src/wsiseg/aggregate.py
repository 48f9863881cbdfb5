"""Aggregate: one summary row per slide, failed slides included with their error."""

from __future__ import annotations

import json

import pandas as pd


def run(stats_csvs: list, failed_jsons: list, out_csv: str, log=print) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in stats_csvs]
    failed = []
    for p in failed_jsons:
        with open(p) as fh:
            info = json.load(fh)
        failed.append(dict(slide_id=info["slide_id"], path=info["path"], status="failed", error=info["error"]))
    if failed:
        frames.append(pd.DataFrame(failed))
    frames = [f for f in frames if len(f)]
    summary = pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame(
        columns=["slide_id", "path", "status", "error"])
    summary = summary.sort_values("slide_id", kind="stable").reset_index(drop=True)
    summary.to_csv(out_csv, index=False)
    log(f"{len(summary)} slides: {int((summary['status'] == 'ok').sum())} ok, {len(failed)} failed")
    for f in failed:
        log(f"FAILED {f['slide_id']}: {f['error']}")
    return summary


def triage(slide_jsons: list, out_tsv: str, log=print) -> pd.DataFrame:
    """slides.tsv: slide_id, status ('ok' or 'failed'), error, path."""
    rows = []
    for p in slide_jsons:
        with open(p) as fh:
            info = json.load(fh)
        rows.append(dict(slide_id=info["slide_id"], status=info["status"], error=info.get("error", ""), path=info["path"]))
    table = pd.DataFrame(rows, columns=["slide_id", "status", "error", "path"])
    table.to_csv(out_tsv, sep="\t", index=False)
    n_bad = int((table["status"] != "ok").sum())
    log(f"{len(table)} slides inspected, {len(table) - n_bad} ok, {n_bad} failed")
    for r in table[table["status"] != "ok"].itertuples():
        log(f"FAILED {r.slide_id}: {r.error}")
    return table
