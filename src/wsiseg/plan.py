"""Plan stage (rule 'plan'): the tile plan of one slide for one model (plan.tsv + plan.json).

The model decides the margin (its halo), the window (its legal input sizes) and any
per-slide calibration (:meth:`wsiseg.models.ModelSpec.calibrate`); the grid is
:func:`wsiseg.tiling.plan_tiles` over the tissue mask.

The plan needs the model's geometry, not its network: a checkpoint of the project's
U-Net is read without torch or scikit-image (``load_model(..., network=False)``; torch
only to measure a halo not yet in ``$WSISEG_CACHE``, or for stain statistics).
"""

from __future__ import annotations

import time

from .geometry import Geometry
from .models import load_model
from .slide import open_slide
from .tiling import Plan, plan_margin, tile_rows, tile_spec_for
from .tissue import TissueInfo, load_mask


def run(
    *,
    slide_path: str,
    slide_id: str,
    mpp,
    tissue_png: str,
    tissue_json: str,
    model_cfg: dict,
    tiling_cfg: dict,
    out_tsv: str,
    out_json: str,
    log=print,
) -> Plan:
    t0 = time.monotonic()
    model = load_model(model_cfg, network=False)
    margin = plan_margin(
        model, tiling_cfg.get("margin", "auto"), bool(tiling_cfg.get("allow_small_margin", False)), log
    )
    spec = tile_spec_for(model, int(tiling_cfg["tile_size"]), margin)
    tissue_downsample = TissueInfo.read(tissue_json).downsample  # level-0 px per tissue-mask px
    with open_slide(slide_path, slide_id, mpp) as slide:
        geom = Geometry.for_slide(slide, model.mpp)
        tiles = tile_rows(geom, spec, load_mask(tissue_png), tissue_downsample)  # no pandas in the job
    calibration = model.calibrate(lambda: open_slide(slide_path, slide_id, mpp), geom, spec, tiles, log)
    rows, cols = -(-geom.height // spec.tile_size), -(-geom.width // spec.tile_size)
    log(
        f"slide {geom.width0}x{geom.height0} level-0 px at {geom.mpp0:.4f} µm/px -> {geom.width}x{geom.height} "
        f"target px at {geom.target_mpp} µm/px, read from level {geom.level} (downsample {geom.level_downsample:g}, "
        f"resample x{1 / geom.scale:.4f})"
    )
    log(
        f"model halo {model.halo} px, border {model.border} px; tile {spec.tile_size} + margin {spec.margin} "
        f"-> window {spec.window} px; {len(tiles)} of {rows * cols} tiles touch tissue"
    )
    plan = Plan(
        tiles=tiles,
        geometry=geom,
        spec=spec,
        slide_id=slide_id,
        model=model.name,
        model_checksum=model.checksum,
        halo=model.halo,
        grid_rows=rows,
        grid_cols=cols,
        tissue_downsample=tissue_downsample,
        model_classes=model.classes,
        mask_classes=model.mask_classes,
        postprocess=model.postprocess,
        calibration=calibration,
        elapsed_s=time.monotonic() - t0,
    )
    plan.write(out_tsv, out_json)
    return plan
