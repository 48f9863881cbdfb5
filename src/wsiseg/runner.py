"""Glue shared by the stage entry points: logging to the rule's log, timing, JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager

from .errors import ConfigError, SlideError


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
def stage(name: str, slide: str, log_path: str | None):
    """Log start/end of a stage; user-facing errors are logged as one clear line."""
    logger = setup_logging(log_path)
    t0 = time.monotonic()
    logger.info(f"{name} {slide}: start")
    try:
        yield logger
    except (SlideError, ConfigError) as exc:
        logger.error(f"{name} failed: {exc}")
        raise SystemExit(1) from None
    except Exception:
        logger.exception(f"{name} {slide}: unexpected error")
        raise
    logger.info(f"{name} {slide}: done in {time.monotonic() - t0:.1f} s")


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)
