"""Glue shared by the stage entry points: logging to the rule's log, timing, JSON."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager

from . import failure


def setup_logging(log_path: str | None) -> logging.Logger:
    logger = logging.getLogger("wsiseg")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


@contextmanager
def stage(name: str, slide: str, log_path: str | None, record: str | None = None, outputs=()):
    """Log start and end of a stage; a failure is logged as one line in our words.

    ``record``: the slide's failure record (:mod:`wsiseg.failure`), removed when the stage
    starts and written when it fails, so that a failing slide costs only itself and the
    archive's summary says why. ``outputs``: the stage's outputs, removed when the disk is
    full, to leave room for the record (Snakemake removes them after a failure anyway).
    """
    logger = setup_logging(log_path)
    t0 = time.monotonic()
    if record:
        failure.clear(record)
    logger.info(f"{name} {slide}: start")
    try:
        yield logger
    except (Exception, MemoryError) as exc:
        rec = failure.explain(
            exc, slide=slide, stage=name, where=os.path.dirname(record or log_path or ""), log=log_path or ""
        )
        if rec.kind == "crash":
            logger.exception(f"{name} {slide}: unexpected error")
        if rec.kind == "disk_full":
            _remove(outputs)
        said = (
            rec.error if record else str(exc) if rec.kind in ("slide", "config") else f"{rec.problem}. Fix: {rec.fix}"
        )
        logger.error(f"{name} failed: {said}")
        if record:
            try:
                rec.write(record)
            except OSError as exc2:
                logger.error(f"{name} {slide}: the failure record {record} could not be written either: {exc2}")
        raise SystemExit(1) from None
    logger.info(f"{name} {slide}: done in {time.monotonic() - t0:.1f} s")


def slide_stage(name: str, sm):
    """:func:`stage` for a rule of one slide, from the script's ``snakemake`` object. Per-slide
    logs are ``<results>/<model>/<slide>/logs/<rule>.log``, so the slide's folder, and
    its failure record, are two levels above the log."""
    slide_dir = os.path.dirname(os.path.dirname(os.path.abspath(sm.log[0])))
    return stage(name, sm.wildcards.slide, sm.log[0], record=failure.record_path(slide_dir), outputs=list(sm.output))


def _remove(paths) -> None:
    for p in paths:
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.remove(p)
        except OSError:
            pass


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)
