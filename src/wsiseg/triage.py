"""Inspect and triage (rules 'inspect' and 'triage'): which slides can be processed.

``inspect`` writes each slide's slide.json (what the slide is and its content
fingerprint, or why it cannot be read: never fails on bad input); ``triage``
collects them in one table, after which the DAG holds only the good slides.
:class:`SlideRecord` is slide.json's one reader.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .content import fingerprint
from .errors import SlideError
from .failure import explain
from .runner import add_run, write_json
from .slide import inspect_slide

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class SlideRecord:
    """slide.json: the inspect stage's record of one slide ('ok' with its description, or
    'failed' with the error that names the slide and the fix)."""

    slide_id: str
    path: str
    status: str  # 'ok' or 'failed'
    error: str = ""
    info: dict = field(default_factory=dict)  # the slide's description (wsiseg.slide.inspect_slide)

    @property
    def fingerprint(self) -> str:
        """The slide file's content key when it was inspected (wsiseg.content.fingerprint)."""
        return self.info.get("fingerprint", "")

    @property
    def warnings(self) -> list:
        """What inspection noticed but did not refuse (e.g. the sheet's mpp overriding the file's)."""
        return list(self.info.get("warnings", []))

    @classmethod
    def read(cls, path: str) -> SlideRecord:
        with open(path) as fh:
            d = json.load(fh)
        return cls(slide_id=d["slide_id"], path=d["path"], status=d["status"], error=d.get("error", ""), info=d)


def inspect(*, path: str, slide_id: str, mpp, out_json: str, log) -> dict:
    """slide.json for one slide: its description and content fingerprint, or why it cannot be
    processed, with the run block of provenance.json (the rule's params: ``path``, ``mpp``).
    Never fails because of the slide: whatever reading it raises is recorded (the triage of
    the whole archive waits for every slide's record)."""
    started = time.time()
    try:
        info = inspect_slide(path, slide_id, mpp)
        info["status"] = "ok"
        log.info(
            f"{slide_id}: {info['vendor']} {info['width']}x{info['height']} px, {info['level_count']} levels, "
            f"{info['mpp']:.4f} µm/px ({info['mpp_source']})"
        )
        for w in info["warnings"]:
            log.warning(f"{slide_id}: {w}")
    except (Exception, MemoryError) as exc:
        error = str(exc) if isinstance(exc, SlideError) else explain(exc, slide=slide_id, stage="inspect").error
        if not isinstance(exc, SlideError):
            log.exception(f"{slide_id}: reading the slide raised")
        info = dict(slide_id=slide_id, path=path, status="failed", error=error)
        log.error(f"SKIPPING {error}")
    try:
        info["fingerprint"] = fingerprint(path)  # what the results were made from (see wsiseg.content)
    except OSError:
        info["fingerprint"] = ""
    write_json(out_json, info)
    add_run(
        record=out_json,
        slide=slide_id,
        stage="inspect",
        started=started,
        params=dict(path=path, mpp=mpp),
        inputs=[path],
    )
    return info


def triage(*, slide_jsons: list, out_tsv: str, log=print) -> pd.DataFrame:
    """slides.tsv: slide_id, status ('ok' or 'failed'), error, path."""
    import pandas as pd  # here, not at the top: inspect (one job per slide, on the submit host) needs none

    rows = []
    for p in slide_jsons:
        rec = SlideRecord.read(p)
        rows.append(dict(slide_id=rec.slide_id, status=rec.status, error=rec.error, path=rec.path))
    table = pd.DataFrame(rows, columns=["slide_id", "status", "error", "path"])
    table.to_csv(out_tsv, sep="\t", index=False)
    n_bad = int((table["status"] != "ok").sum())
    log(f"{len(table)} slides inspected, {len(table) - n_bad} ok, {n_bad} failed")
    for r in table[table["status"] != "ok"].itertuples():
        log(f"FAILED {r.slide_id}: {r.error}")
    return table
