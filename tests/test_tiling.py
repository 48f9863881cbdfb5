import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import CMU, needs_data

from wsiseg.geometry import Geometry
from wsiseg.slide import open_slide
from wsiseg.tiling import PLAN_COLUMNS, Plan, TileSpec, plan_rows, plan_tiles, tile_rows


@needs_data
def test_plan_keeps_only_tissue_tiles_and_names_both_regions():
    with open_slide(str(CMU)) as s:
        g = Geometry.for_slide(s, 0.998)  # 2x: 1110 x 1484 target px
    spec = TileSpec(tile_size=256, margin=32, window=320, out_offset=0, align=16)
    tissue = np.zeros((100, 100), bool)
    tissue[0:10, 0:10] = True  # tissue only in the top-left corner
    plan = plan_tiles(g, spec, tissue, tissue_downsample=g.width0 / 100)
    assert list(zip(plan.row, plan.col)) == [(0, 0)]
    full = plan_tiles(g, spec, None, 1)
    assert len(full) == 5 * 6
    assert (g.width, g.height) == (1110, 1484)
    last = list(full.itertuples())[-1]
    assert (last.tx, last.ty) == (1024, 1280) and (last.tw, last.th) == (1110 - 1024, 1484 - 1280)
    assert (last.wx, last.wy, last.n) == (1024 - 32, 1280 - 32, 320)
    assert last.x0 == round(1024 * g.scale0) and (full.tx % 16 == 0).all()


def test_tile_size_must_align_with_depth():
    with pytest.raises(AssertionError):
        TileSpec(tile_size=250, margin=8, window=266, out_offset=0, align=16)


def test_plan_artefact_roundtrip(tmp_path):
    """plan.tsv + plan.json through their one writer and reader: the same plan, the same
    keys in the same order as the workflow has always written them, calibration kept."""
    g = Geometry(
        width0=2000,
        height0=1000,
        mpp0=0.25,
        target_mpp=0.5,
        level=1,
        level_downsample=2.0,
        level_width=1000,
        level_height=500,
        width=1000,
        height=500,
    )
    spec = TileSpec(tile_size=256, margin=32, window=320, out_offset=0, align=16)
    tiles = plan_tiles(g, spec, None, 1)
    plan = Plan(
        tiles=tiles,
        geometry=g,
        spec=spec,
        slide_id="s",
        model="m",
        model_checksum="abc",
        halo=30,
        grid_rows=2,
        grid_cols=4,
        tissue_downsample=32.0,
        model_classes=["background", "nucleus", "boundary"],
        mask_classes=["background", "nucleus"],
        postprocess={"fg_threshold": 0.7},
        calibration={"classical_threshold": 0.06},
        elapsed_s=1.5,
    )
    plan.write(str(tmp_path / "p.tsv"), str(tmp_path / "p.json"))
    # the plan stage writes its rows without pandas: the same bytes as the DataFrame's to_csv
    # (a speckled tissue mask: tissue fractions of every kind of float)
    speckle = np.random.default_rng(0).random((32, 64)) > 0.6
    rows = tile_rows(g, spec, speckle, 32.0)
    frame = plan_tiles(g, spec, speckle, 32.0)
    assert len(rows) == 8 and len({r.tissue_fraction for r in rows}) == 8 and list(frame.columns) == PLAN_COLUMNS
    assert [tuple(r) for r in frame.itertuples(index=False)] == rows
    for name, table in (("frame", frame), ("rows", rows)):
        replace(plan, tiles=table).write(str(tmp_path / f"{name}.tsv"), str(tmp_path / f"{name}.json"))
    assert (tmp_path / "rows.tsv").read_bytes() == (tmp_path / "frame.tsv").read_bytes()
    assert (tmp_path / "rows.json").read_bytes() == (tmp_path / "frame.json").read_bytes()
    meta = json.load(open(tmp_path / "p.json"))
    assert list(meta) == [
        "geometry",
        "tiles",
        "n_tiles",
        "slide_id",
        "model",
        "model_checksum",
        "halo",
        "grid_rows",
        "grid_cols",
        "elapsed_s",
        "tissue_downsample",
        "model_classes",
        "mask_classes",
        "postprocess",
        "classical_threshold",
    ]
    back = Plan.read(str(tmp_path / "p.tsv"), str(tmp_path / "p.json"))
    assert back.geometry == g and back.spec == spec and back.n_tiles == len(tiles) == 8
    assert back.calibration == {"classical_threshold": 0.06} and back.geometry.scale0 == 2.0
    assert back.tiles.equals(tiles)
    rows = Plan.read(str(tmp_path / "p.tsv"), str(tmp_path / "p.json"), frame=False)  # no pandas: the segment job
    assert rows.n_tiles == 8 and rows.tiles == tuple(tiles.itertuples(index=False))
    assert all(type(v) is int for r in rows.tiles for v in r[:-1]) and type(rows.tiles[0].tissue_fraction) is float
    assert plan_rows(rows.tiles) == plan_rows(tiles) == list(rows.tiles)
    only_meta = Plan.read_meta(str(tmp_path / "p.json"))
    assert only_meta.n_tiles == 8 and only_meta.tiles == () and only_meta.mask_classes == ["background", "nucleus"]
