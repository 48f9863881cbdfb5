"""Stats stage (rule 'stats'): one row of per-class areas, object counts and morphometrics
per slide (stats.csv), one row per object with its shape, stain and neighbourhood
(objects.csv.gz) and every object's outline for QuPath (outlines.geojson.gz), streamed
tile by tile over the mask (:mod:`wsiseg.objects`, :mod:`wsiseg.morphometrics`,
:mod:`wsiseg.outlines`), with the slide read at the mask's grid for the stain."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from .errors import SlideError
from .geometry import Geometry, read_target
from .mask import MaskReader
from .objects import add_neighbours, count_objects, object_rows, shape_features, write_objects
from .outlines import OutlineCollector, write_geojson
from .provenance import device_label, software
from .runner import read_json
from .slide import open_slide
from .tiling import Plan
from .tissue import TissueInfo
from .triage import SlideRecord


class SlidePixels:
    """RGB (0..255, float) of regions of the mask's grid, read from the slide as the segment
    stage reads its tiles (:func:`wsiseg.geometry.read_target`: the same level and
    resampling); None where the slide's pixels cannot be decoded (the tiles the segment stage
    left as background), after which the slide is opened again (an OpenSlide handle stays in
    an error state)."""

    def __init__(self, path: str, slide_id: str, mpp: float | None, geom: Geometry):
        self.path, self.slide_id, self.mpp, self.geom = path, slide_id, mpp, geom
        self.unreadable = 0  # regions that could not be read
        self._slide = None

    def __call__(self, x: int, y: int, w: int, h: int):
        if self._slide is None:
            self._slide = open_slide(self.path, self.slide_id, self.mpp)
        try:
            return read_target(self._slide, self.geom, x, y, w, h)
        except SlideError:
            self.close()
            self.unreadable += 1
            return None

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def _median(v) -> float:
    v = np.asarray(v, np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


#: stats.csv medians per class: column suffix -> objects.csv.gz column
MEDIANS = {
    "median_perimeter_um": "perimeter_um",
    "median_circularity": "circularity",
    "median_eccentricity": "eccentricity",
    "median_solidity": "solidity",
    "median_hematoxylin_od": "mean_hematoxylin_od",
    "median_nearest_neighbour_um": "nearest_neighbour_um",
}


def measure(mask_path: str, classes: list, mpp: float, outlines=None, pixels=None) -> tuple[dict, dict]:
    """(stats columns for each class, count_objects' result with each object's neighbours) of
    a mask at ``mpp`` µm/px; ``pixels``: the slide's RGB on the mask's grid (:class:`SlidePixels`)
    for the objects' colour."""
    mask = MaskReader(mask_path)
    h, w = mask.shape
    counts = count_objects(mask.tiles(), w, len(classes), outlines=outlines, pixels=pixels)
    add_neighbours(counts, len(classes), mpp)
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
        o = c["objects"]
        values = {**shape_features(o, mpp), "nearest_neighbour_um": o["nearest_um"]}
        values["mean_hematoxylin_od"] = o.get("mean_hematoxylin_od", np.full(len(areas), np.nan))
        for col, src in MEDIANS.items():
            row[f"{name}_{col}"] = _median(values[src])
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
    slide_path: str | None = None,
    slide_mpp: float | None = None,
    log=print,
) -> dict:
    """Stats stage: one-row stats.csv for a slide, (``objects_csv``) one row per object and
    (``outlines_geojson``) every object's outline for QuPath. ``slide_path`` (and the sample
    sheet's ``slide_mpp``, as the segment stage opened it): the slide, for the objects' colour
    (without it the colour columns are empty)."""
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
    pixels = SlidePixels(slide_path, rec.slide_id, slide_mpp, geom) if slide_path else None
    try:
        cls_row, counts = measure(mask_path, classes, mpp, outlines=collector, pixels=pixels)
        if pixels is not None and pixels.unreadable:
            no_colour = sum(int(np.isnan(counts[k]["objects"]["mean_red"]).sum()) for k in range(1, len(classes)))
            log(
                f"{pixels.unreadable} regions of the slide could not be read: {no_colour} objects "
                "have no colour measurements (empty in objects.csv.gz)"
            )
        if (cls_row["mask_width_px"], cls_row["mask_height_px"]) != (geom.width, geom.height):
            raise RuntimeError("mask size differs from the tile plan's target size")
        row.update(cls_row)
        tissue = row["tissue_area_mm2"]
        for name in classes[1:]:
            row[f"{name}_fraction_of_tissue"] = row[f"{name}_area_mm2"] / tissue if tissue > 0 else float("nan")
            row[f"{name}_per_mm2"] = row[f"{name}_count"] / tissue if tissue > 0 else float("nan")
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
        if pixels is not None:
            pixels.close()
        if collector is not None:
            collector.discard()  # its temporary file, whether the outlines were written or not
