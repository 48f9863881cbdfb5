"""Format 'classical': the haematoxylin baseline (:mod:`wsiseg.classical`) as a model.

No weights, no GPU. Its one per-slide calibration is the haematoxylin threshold,
measured by the plan stage over a sample of the slide's tissue tiles and stored in
plan.json (``classical_threshold``); the segment stage applies it to every tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .. import classical
from .sampling import sample_rows, sampled_windows
from .spec import ModelSpec

CLASSICAL_SAMPLE_TILES = 64  # tissue tiles whose haematoxylin histogram sets a slide's threshold


@dataclass
class ClassicalSpec(ModelSpec):
    wants_gpu: ClassVar[bool] = False
    supports_tta: ClassVar[bool] = False

    def output_size(self, n: int) -> int | None:
        return n

    def calibrate(self, opener, geom, spec, tiles, log) -> dict:
        """The one haematoxylin threshold for the whole slide (see :mod:`wsiseg.classical`).

        A sampled tile that cannot be decoded is skipped (:func:`.sampling.sampled_windows`).
        """
        params = self.module.params
        rows = sample_rows(len(tiles), CLASSICAL_SAMPLE_TILES)
        windows = sampled_windows(opener, geom, tiles, rows, log, "classical model")

        try:
            thr = classical.slide_threshold(windows, geom.target_mpp, params, spec.margin)
        except ValueError:  # no tiles, or uniform pixels: nothing to segment
            log("classical model: no tissue contrast to set the haematoxylin threshold; the mask will be empty")
            return dict(classical_threshold=None)
        log(f"classical model: haematoxylin threshold {thr:.4f} (Otsu over {len(rows)} tissue tiles)")
        return dict(classical_threshold=thr)

    def apply_calibration(self, calibration: dict, log) -> bool:
        self.module.threshold = calibration.get("classical_threshold")
        log(
            f"classical model (no GPU): haematoxylin threshold {self.module.threshold}, "
            f"settings {self.module.params.as_dict()}"
        )
        return self.module.threshold is not None

    @property
    def evaluate_mpp(self) -> float | None:
        return None  # works at each labeled image's own resolution: nothing to resample

    def predict_instances(self, sample, tta: bool, device="cpu") -> np.ndarray:
        """Otsu's threshold of this image (no slide to calibrate on), at its own mpp."""
        from ..postprocess import classical_instances

        return classical_instances(sample.native_image, sample.mpp, self.module.params)

    def describe(self) -> str:
        return f"classical model {self.name}: settings {self.module.params.as_dict()}"


def load(cfg: dict, device: str = "cpu", geometry: bool = True, network: bool = True) -> ClassicalSpec:
    params = classical.params_from_cfg(cfg)
    mpp = float(cfg["mpp"])
    module = classical.ClassicalNuclei(mpp, params)
    return ClassicalSpec(
        module,
        list(classical.CLASSES),
        mpp,
        cfg["name"],
        classical.checksum(params),
        "classical",
        1,
        0,
        classical.halo_px(params, mpp),
    )
