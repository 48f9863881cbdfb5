import pandas as pd
import pytest
from conftest import SLIDES, needs_data

from wsiseg.sheet import SheetError, check_sheet, read_sheet, sanitise_slide_id, slides_from_dir


def test_sanitise_real_ndpi_names():
    assert sanitise_slide_id("test3-DAPI 2 (387) .ndpi") == "test3-DAPI_2_387"
    assert sanitise_slide_id("TCGA-AB.svs") == "TCGA-AB"
    assert sanitise_slide_id("x.ome.tiff") == "x"


@needs_data
def test_slides_dir_groups_dicom_series_and_keeps_spaces():
    sheet = check_sheet(slides_from_dir(str(SLIDES), "**/*"))
    assert "dicom-cmu-1-small-region" in sheet.index  # 12 files, one slide
    assert sheet.loc["dicom-cmu-1-small-region", "path"].endswith(".dcm")
    assert sheet.loc["test3-DAPI_2_387", "path"].endswith("test3-DAPI 2 (387) .ndpi")
    assert sheet["mpp"].isna().all()


def test_duplicate_ids_rejected():
    with pytest.raises(SheetError, match="more than once"):
        check_sheet(pd.DataFrame(dict(slide_id=["a", "a"], path=["x", "y"])))
    with pytest.raises(SheetError, match="letters"):
        check_sheet(pd.DataFrame(dict(slide_id=["a b"], path=["x"])))


def test_hash_starts_a_comment_only_at_the_start_of_a_line(tmp_path):
    sheet = tmp_path / "slides.tsv"
    sheet.write_text("# my archive\nslide_id\tpath\tmpp\n  # an indented comment\ncase#1\t/data/run #3/a.svs\t0.25\n")
    s = read_sheet(str(sheet))
    assert s["slide_id"].tolist() == ["case#1"] and s["path"].tolist() == ["/data/run #3/a.svs"]
    assert s["mpp"].tolist() == [0.25]
    with pytest.raises(SheetError, match=r"case#1"):  # kept whole, so the error names it
        check_sheet(s)


def test_names_the_workflow_writes_are_not_slide_ids():
    for name in ("summary.csv", "slides.tsv", "triage.log"):
        with pytest.raises(SheetError, match="rename the slide"):
            check_sheet(pd.DataFrame(dict(slide_id=[name], path=["x"])))
