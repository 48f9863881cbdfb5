import pandas as pd
import pytest
from conftest import SLIDES, needs_data

from wsiseg.sheet import SheetError, check_sheet, sanitise_slide_id, slides_from_dir

pytestmark = needs_data  # reads ../shared/data


def test_sanitise_real_ndpi_names():
    assert sanitise_slide_id("test3-DAPI 2 (387) .ndpi") == "test3-DAPI_2_387"
    assert sanitise_slide_id("TCGA-AB.svs") == "TCGA-AB"
    assert sanitise_slide_id("x.ome.tiff") == "x"


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
