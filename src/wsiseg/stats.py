"""Stats stage (rule 'stats'): one row of per-class areas and object counts per slide
(stats.csv), one row per object (objects.csv.gz) and every object's outline for QuPath
(outlines.geojson.gz), streamed tile by tile over the mask (:mod:`wsiseg.objects`,
:mod:`wsiseg.outlines`)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .mask import MaskReader
from .objects import count_objects, object_rows, write_objects
from .outlines import OutlineCollector, write_geojson
from .provenance import device_label, software
from .runner import read_json
from .tiling import Plan
from .tissue import TissueInfo
from .triage import SlideRecord


def measure(mask_path: str, classes: list, mpp: float, outlines=None) -> tuple[dict, dict]:
    """(stats columns for each class, count_objects' result) of a mask at ``mpp`` µm/px."""
    mask = MaskReader(mask_path)
    h, w = mask.shape
    counts = count_objects(mask.tiles(), w, len(classes), outlines=outlines)
    px_um2 = mpp * mpp
    row = {"mask_width_px": w, "mask_height_px": h}
    for k, name in enumerate(classes):
        if k == 0:
            continue
        c = counts[k]
        areas = c["object_areas"] * px_um2
        row[f"{name}_area_mm2"] = c["pixels"] * px_um2 / 1e6
        row[f"{name}_pixels"] = c["pixels"]
        row[f"{name}_count"] = int(len(areas))
        row[f"{name}_mean_area_um2"] = float(areas.mean()) if len(areas) else float("nan")
        row[f"{name}_median_area_um2"] = float(np.median(areas)) if len(areas) else float("nan")
    return row, counts


def run(
    *,
    mask_path: str,
    slide_json: str,
    tissue_json: str,
    plan_json: str,
    timing_jsons: list,
    classes: list,
    out_csv: str,
    objects_csv: str | None = None,
    outlines_geojson: str | None = None,
    log=print,
) -> dict:
    """Stats stage: one-row stats.csv for a slide, (``objects_csv``) one row per object and
    (``outlines_geojson``) every object's outline for QuPath."""
    t0 = time.monotonic()
    rec, ti, pl = SlideRecord.read(slide_json), TissueInfo.read(tissue_json), Plan.read_meta(plan_json)
    sl = rec.info  # the slide's description, as inspect recorded it
    geom = pl.geometry
    mpp = geom.target_mpp
    classes = pl.mask_classes or classes  # the plan knows the model's mask classes
    row = dict(
        slide_id=rec.slide_id,
        path=rec.path,
        status="ok",
        error="",
        vendor=sl["vendor"],
        width_px=sl["width"],
        height_px=sl["height"],
        slide_mpp=sl["mpp"],
        mpp_source=sl["mpp_source"],
        mpp_used=mpp,
        level_read=geom.level,
        tissue_method=ti.method,
        tissue_area_mm2=ti.tissue_area_mm2,
        n_tiles=pl.n_tiles,
    )
    scale0 = geom.scale0  # level-0 px per mask px, as the plan used it
    collector = None
    if outlines_geojson:
        collector = OutlineCollector(outlines_geojson + ".pieces", scale0)
    try:
        cls_row, counts = measure(mask_path, classes, mpp, outlines=collector)
        if (cls_row["mask_width_px"], cls_row["mask_height_px"]) != (geom.width, geom.height):
            raise RuntimeError("mask size differs from the tile plan's target size")
        row.update(cls_row)
        tissue = row["tissue_area_mm2"]
        for name in classes[1:]:
            row[f"{name}_fraction_of_tissue"] = row[f"{name}_area_mm2"] / tissue if tissue > 0 else float("nan")
        row["model"] = pl.model
        row["model_sha256"] = pl.model_checksum
        stage_info = [read_json(p) for p in timing_jsons]
        row["model_tta"] = any(bool(i.get("tta", False)) for i in stage_info)
        row["tiles_unreadable"] = sum(int(i.get("tiles_unreadable", 0)) for i in stage_info)
        # provenance (every stage's in provenance.json): the device that ran the model, the code of this row
        row["device"] = next((device_label(i) for i in stage_info if "device" in i), "")
        row["wsiseg_version"], row["git_commit"] = software()["wsiseg_version"], software()["git_commit"] or ""
        timings = [i.get("elapsed_s", 0.0) for i in stage_info]
        row["wall_time_s"] = round(sum(timings) + pl.elapsed_s + ti.elapsed_s + time.monotonic() - t0, 2)
        # stable column order: identity, slide, tissue, per class, model, time
        cols = list(row)
        if objects_csv:
            n = write_objects(objects_csv, object_rows(counts, classes, mpp, scale0, row["slide_id"]))
            log(f"{n} objects -> {objects_csv}")
        if collector is not None:
            n = write_geojson(outlines_geojson, collector, counts, classes, mpp, row["slide_id"])
            log(f"{n} outlines -> {outlines_geojson}")
        pd.DataFrame([row], columns=cols).to_csv(out_csv, index=False)
        log(f"{row['slide_id']}: " + ", ".join(f"{c}={row[c]}" for c in cols if c.endswith(("_count", "_area_mm2"))))
        return row
    finally:
        if collector is not None:
            collector.discard()  # its temporary file, whether the outlines were written or not
