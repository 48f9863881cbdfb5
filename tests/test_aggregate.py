import json

import pandas as pd

from wsiseg.aggregate import run
from wsiseg.triage import triage


def test_summary_keeps_failed_slides_with_their_error(tmp_path):
    ok = tmp_path / "a.csv"
    pd.DataFrame([dict(slide_id="b", path="/x/b.svs", status="ok", error="", nucleus_count=3)]).to_csv(ok, index=False)
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps(dict(slide_id="a", path="/x/a.svs", status="failed", error="slide 'a': broken. Fix: x")))
    said = []
    out = run(stats_csvs=[str(ok)], failed_jsons=[str(bad)], out_csv=str(tmp_path / "s.csv"), log=said.append)
    assert out["slide_id"].tolist() == ["a", "b"] and out["status"].tolist() == ["failed", "ok"]
    back = pd.read_csv(tmp_path / "s.csv")
    assert back.loc[0, "error"].startswith("slide 'a'") and back.loc[1, "nucleus_count"] == 3
    assert any("FAILED a" in s for s in said)
    t = triage(slide_jsons=[str(bad)], out_tsv=str(tmp_path / "t.tsv"), log=said.append)
    assert t.loc[0, "status"] == "failed"
