"""Checkpoint 'inspect': record whether a slide can be processed (never fails on bad input)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wsiseg.errors import SlideError  # noqa: E402
from wsiseg.runner import setup_logging, write_json  # noqa: E402
from wsiseg.slide import inspect_slide  # noqa: E402

sm = snakemake  # noqa: F821
slide_id = sm.wildcards.slide
log = setup_logging(sm.log[0])
try:
    info = inspect_slide(sm.params.path, slide_id, sm.params.mpp)
    info["status"] = "ok"
    log.info(f"{slide_id}: {info['vendor']} {info['width']}x{info['height']} px, {info['level_count']} levels, "
             f"{info['mpp']:.4f} µm/px ({info['mpp_source']})")
    for w in info["warnings"]:
        log.warning(f"{slide_id}: {w}")
except SlideError as exc:
    info = dict(slide_id=slide_id, path=sm.params.path, status="failed", error=str(exc))
    log.error(f"SKIPPING {exc}")
write_json(sm.output[0], info)
