import json

import pandas as pd

from wsiseg.aggregate import NO_TISSUE, outcome, run
from wsiseg.failure import FailureRecord, not_finished
from wsiseg.triage import triage


def slide_json(tmp_path, sid, status="ok", error="", **info):
    p = tmp_path / f"{sid}.json"
    p.write_text(json.dumps(dict(slide_id=sid, path=f"/x/{sid}.svs", status=status, error=error, **info)))
    return str(p)


def stats_csv(tmp_path, sid, **cols):
    p = tmp_path / f"{sid}.csv"
    row = dict(slide_id=sid, path=f"/x/{sid}.svs", status="ok", error="", width_px=2220, tissue_area_mm2=1.5)
    pd.DataFrame([{**row, **cols}]).to_csv(p, index=False)
    return str(p)


def test_summary_keeps_failed_slides_with_their_error(tmp_path):
    ok = stats_csv(tmp_path, "b", nucleus_count=3)
    bad = slide_json(tmp_path, "a", status="failed", error="slide 'a': broken. Fix: x")
    said = []
    out = run(
        stats_csvs=[ok],
        slide_jsons=[bad, slide_json(tmp_path, "b")],
        out_csv=str(tmp_path / "s.csv"),
        log=said.append,
    )
    assert out["slide_id"].tolist() == ["a", "b"] and out["status"].tolist() == ["failed", "ok"]
    back = pd.read_csv(tmp_path / "s.csv")
    assert back.loc[0, "error"].startswith("slide 'a'") and back.loc[1, "nucleus_count"] == 3
    assert back.loc[0, "failed_stage"] == "inspect"
    assert any("FAILED a [inspect]" in s for s in said)
    t = triage(slide_jsons=[bad], out_tsv=str(tmp_path / "t.tsv"), log=said.append)
    assert t.loc[0, "status"] == "failed"


def test_every_slide_explained_after_a_failed_run(tmp_path):
    """What the onerror handler writes: finished slides as they are; a slide whose stage
    failed with that stage, reason and fix; one that never got its turn as incomplete.
    A stale stats.csv of a slide that failed is not reported as current."""
    jsons = [slide_json(tmp_path, s) for s in ("a", "b", "c", "d", "e")]
    stats = [stats_csv(tmp_path, s, nucleus_count=5) for s in ("a", "b")]  # b: from an earlier run
    seg = FailureRecord("b", "segment", "slide", "12 of 12 tiles could not be decoded", "re-export it")
    late = not_finished(slide="c", stage="stitch", log="results/m/c/logs/stitch.log", failed=False)
    killed = not_finished(slide="d", stage="segment", log="results/m/d/logs/segment.log", failed=True)
    mate = not_finished(slide="e", stage="tissue", log="results/m/e/logs/tissue.log", failed=True, batch=["b"])
    said = []
    out = run(
        stats_csvs=stats,
        slide_jsons=jsons,
        failures=[seg, late, killed, mate],
        out_csv=str(tmp_path / "s.csv"),
        log=said.append,
    )
    back = pd.read_csv(tmp_path / "s.csv", keep_default_na=False).set_index("slide_id")
    assert back["status"].to_dict() == dict(a="ok", b="failed", c="incomplete", d="failed", e="incomplete")
    assert back["failed_stage"].to_dict() == dict(a="", b="segment", c="stitch", d="segment", e="tissue")
    assert "ran in one cluster job with b, and that job failed" in back.loc["e", "error"]  # a batch mate
    assert back.loc["b", "error"] == "slide 'b': 12 of 12 tiles could not be decoded. Fix: re-export it"
    assert back.loc["b", "nucleus_count"] == "" and back.loc["a", "nucleus_count"] == "5"  # b's old row is gone
    assert "killed" in back.loc["d", "error"] and "results/m/d/logs/segment.log" in back.loc["d", "error"]
    assert back.loc["a", "width_px"] == "2220"  # counts stay integers beside the failed rows' empty cells
    assert said[0] == "5 slides: 1 ok, 2 failed, 2 incomplete"
    assert "FAILED b [segment]: slide 'b': 12 of 12 tiles" in said[1] and said[2].startswith("INCOMPLETE c [stitch]")
    assert list(out.columns[:6]) == ["slide_id", "path", "status", "failed_stage", "error", "warning"]


def test_slides_to_look_at_are_flagged(tmp_path):
    jsons = [
        slide_json(tmp_path, "empty"),
        slide_json(tmp_path, "holes"),
        slide_json(tmp_path, "mpp", warnings=["the sheet's mpp 0.25 overrides the file's 0.5 µm/px (2.00x)"]),
        slide_json(tmp_path, "fine"),
    ]
    stats = [
        stats_csv(tmp_path, "empty", tissue_area_mm2=0.0),
        stats_csv(tmp_path, "holes", tiles_unreadable=2),
        stats_csv(tmp_path, "mpp"),
        stats_csv(tmp_path, "fine", tiles_unreadable=0),
    ]
    said = []
    out = run(stats_csvs=stats, slide_jsons=jsons, out_csv=str(tmp_path / "s.csv"), log=said.append)
    w = out.set_index("slide_id")["warning"]
    assert w["empty"] == NO_TISSUE and w["fine"] == ""
    assert w["holes"].startswith("2 unreadable tile(s) left as background") and "overrides" in w["mpp"]
    assert said[0] == "4 slides: 4 ok, 0 failed; 3 with a warning"
    assert f"WARNING empty: {NO_TISSUE}" in said
    assert outcome(pd.read_csv(tmp_path / "s.csv", keep_default_na=False)) == said
