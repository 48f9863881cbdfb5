"""Aggregate: one summary row per slide, failed slides included with their error."""

from __future__ import annotations

import pandas as pd

from .triage import SlideRecord


def run(*, stats_csvs: list, failed_jsons: list, out_csv: str, log=print) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in stats_csvs]
    failed = []
    for p in failed_jsons:
        rec = SlideRecord.read(p)
        failed.append(dict(slide_id=rec.slide_id, path=rec.path, status="failed", error=rec.error))
    if failed:
        frames.append(pd.DataFrame(failed))
    frames = [f for f in frames if len(f)]
    summary = (
        pd.concat(frames, ignore_index=True, sort=False)
        if frames
        else pd.DataFrame(columns=["slide_id", "path", "status", "error"])
    )
    summary = summary.sort_values("slide_id", kind="stable").reset_index(drop=True)
    summary.to_csv(out_csv, index=False)
    log(f"{len(summary)} slides: {int((summary['status'] == 'ok').sum())} ok, {len(failed)} failed")
    for f in failed:
        log(f"FAILED {f['slide_id']}: {f['error']}")
    return summary
