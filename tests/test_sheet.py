import pandas as pd
import pytest
from conftest import SLIDES, needs_data

from wsiseg.sheet import (
    LINE,
    RESERVED_IDS,
    SheetError,
    check_sheet,
    read_sheet,
    sanitise_slide_id,
    slides_from_dir,
)


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


def sheet_file(tmp_path, text):
    path = tmp_path / "slides.tsv"
    path.write_text(text)
    return str(path)


def problems(path):
    with pytest.raises(SheetError) as err:
        check_sheet(read_sheet(path))
    return str(err.value)


def test_hash_starts_a_comment_only_at_the_start_of_a_line(tmp_path):
    path = sheet_file(
        tmp_path, "# my archive\nslide_id\tpath\tmpp\n  # an indented comment\ncase#1\t/data/run #3/a.svs\t0.25\n"
    )
    s = read_sheet(path)
    assert s["slide_id"].tolist() == ["case#1"] and s["path"].tolist() == ["/data/run #3/a.svs"]
    assert s["mpp"].tolist() == [0.25]
    said = problems(path)  # kept whole, so the error names it, on the line an editor shows
    assert "line 4 (slide_id 'case#1')" in said


def test_names_the_workflow_writes_are_not_slide_ids(tmp_path):
    for name in ("summary.csv", "slides.tsv", "logs", "report", "Summary.CSV", "LOGS"):
        with pytest.raises(SheetError, match="rename the slide"):
            check_sheet(pd.DataFrame(dict(slide_id=[name], path=["x"])))
    # what the workflow writes in <results>/<model>/ beside the slides' folders
    assert RESERVED_IDS == {"summary.csv", "slides.tsv", "logs", "report"}


def test_every_error_names_the_editors_line_and_the_slide(tmp_path):
    path = sheet_file(
        tmp_path,
        "# cohort 2, rescanned\n"  # 1
        "slide_id\tpath\tmpp\n"  # 2: header
        "\n"  # 3: blank
        "case01\t/data/case01.svs\t0,25\n"  # 4: decimal comma
        "summary.csv\t/data/s.svs\t\n"  # 5: reserved
        "\t/data/noid.svs\t\n"  # 6: empty id
        "# case02 rescanned below\n"  # 7
        "case02\t\t\n"  # 8: empty path
        "case01\t/data/again.svs\t\n"  # 9: duplicate of line 4
        "case 3\t/data/c3.svs\t-1\n",  # 10: bad id, bad mpp
    )
    said = problems(path)
    for want in (
        "slides.tsv: 7 problem(s)",
        "line 4 (slide_id 'case01'): mpp '0,25' is not a positive number",
        "use a dot",
        "line 5 (slide_id 'summary.csv'): 'summary.csv' is a name the workflow writes",
        "line 6 (no slide_id): slide_id is empty",
        "line 8 (slide_id 'case02'): path is empty",
        "slide_id 'case01' appears more than once (line 4, line 9)",
        "line 10 (slide_id 'case 3'): slide_id 'case 3' has characters other than",
        "line 10 (slide_id 'case 3'): mpp '-1'",
    ):
        assert want in said, (want, said)


def test_a_field_too_many_is_refused_trailing_empty_ones_are_not(tmp_path):
    path = sheet_file(tmp_path, "slide_id\tpath\tmpp\n\ncase01\t/data/a.svs\t\t\t\ncase02\t/data/b.svs\t0.5\tq\n")
    with pytest.raises(SheetError, match=r"slides.tsv line 4: 4 fields but the header has 3 \(\['q'\] would be lost\)"):
        read_sheet(path)
    path = sheet_file(tmp_path, "slide_id\tpath\tmpp\ncase01\t/data/a.svs\t\t\t\r\ncase02\t/data/b.svs\t0.5\r\n")
    s = check_sheet(read_sheet(path))  # a spreadsheet's trailing tabs and CRLF line ends
    assert s["path"].tolist() == ["/data/a.svs", "/data/b.svs"] and s["mpp"].iloc[1] == 0.5
    assert s[LINE].tolist() == [2, 3]


def test_slides_dir_errors_name_the_files(tmp_path):
    for name in ("a b.svs", "a_b.svs"):
        (tmp_path / name).write_text("x")
    with pytest.raises(SheetError) as err:
        check_sheet(slides_from_dir(str(tmp_path), "*.svs"))
    said = str(err.value)
    assert f"slides_dir {tmp_path}" in said and "'a_b' appears more than once" in said
    assert str(tmp_path / "a b.svs") in said and "rename one of the files" in said
