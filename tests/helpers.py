"""Test-side helpers that the workflow itself does not need: a merger that keeps a whole
image's outputs in memory, tiles of an in-memory mask, and a mask's stats row."""

from collections.abc import Iterator

import numpy as np
import torch


class ArrayMerger:
    """Full output array in memory (K, H, W), in the segment stage's merger interface
    (``aggregate(tile, output, keep)`` / ``finalize()``): for small images only."""

    def __init__(self, geom, n_classes: int):
        self.logits = np.full((n_classes, geom.height, geom.width), np.nan, np.float32)

    def aggregate(self, tile, out: torch.Tensor, keep: slice) -> None:
        self.logits[:, tile.ty : tile.ty + tile.th, tile.tx : tile.tx + tile.tw] = (
            out[:, keep, keep][:, : tile.th, : tile.tw].float().cpu().numpy()
        )

    def finalize(self) -> np.ndarray:
        return self.logits


def one_pass(spec, img, margin, grid_w, grid_h, tta=False, module=None, device="cpu"):
    """The network (or ``module``) once over the whole image, mirror-padded like the tiles (the
    grid of ``grid_w`` x ``grid_h`` plus ``margin``, made a legal input), on ``device``, under
    whatever autocast the caller set: float32 logits, or with ``tta`` the probabilities averaged
    over the 8 flips/rotations."""
    from wsiseg.tiling import legal_input
    from wsiseg.unet import softmax_tta

    h, w = img.shape[:2]
    right = legal_input(spec, grid_w + 2 * margin) - grid_w - margin
    bottom = legal_input(spec, grid_h + 2 * margin) - grid_h - margin
    padded = np.pad(img, ((margin, bottom + grid_h - h), (margin, right + grid_w - w), (0, 0)), mode="reflect")
    x = torch.from_numpy(padded.transpose(2, 0, 1).copy())[None].to(device) / 255.0
    with torch.inference_mode():
        module = spec.module if module is None else module
        out = (softmax_tta(module, x) if tta else module(x))[0].float().cpu().numpy()
    o = margin - spec.border
    return out[:, o : o + h, o : o + w]


def array_tiles(arr: np.ndarray, tile: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(x, y, tile) of an in-memory mask in raster order, as wsiseg.mask.MaskReader.tiles gives them."""
    for y in range(0, arr.shape[0], tile):
        for x in range(0, arr.shape[1], tile):
            yield x, y, arr[y : y + tile, x : x + tile]


def slide_stats(mask_path: str, classes: list, mpp: float) -> dict:
    """Stats columns for each class of a mask OME-TIFF at ``mpp`` µm/px."""
    from wsiseg.stats import measure

    return measure(mask_path, classes, mpp)[0]


class FailingLabeler:
    """Per-tile post-processing that fails on a window whose output holds NaN (what a diverged
    network gives); with ``exit_process`` the worker dies instead, as one the OOM killer ends."""

    def __init__(self, exit_process: bool = False):
        self.exit_process = exit_process

    def __call__(self, out, keep, th, tw):
        import os

        if bool(torch.isnan(out).any()):
            if self.exit_process:
                os._exit(3)
            raise ValueError("NaN in the network's output")
        return np.zeros((th, tw), np.uint8)


class SlowLabeler:
    """Per-tile post-processing that takes ``seconds`` (to catch the stage mid-run)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, out, keep, th, tw):
        import time

        time.sleep(self.seconds)
        return np.zeros((th, tw), np.uint8)


class FirstChannelLabeler:
    """Per-tile 'post-processing' that writes the output's channel 1 as labels (to see which
    output reached which tile)."""

    def __call__(self, out, keep, th, tw):
        return out[1, keep, keep][:th, :tw].numpy().astype(np.uint8)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{self.marker}'",))


def pickle_payload(path, marker) -> None:
    """A .pt that runs a command when unpickled (touching ``marker``), as a malicious or
    careless "weights" file does: a dict with a state_dict that is a call of os.system."""
    torch.save({"state_dict": _Payload(marker)}, str(path))


def all_tissue(tmp_path, slide, slide_id: str = "cmu") -> dict:
    """The plan stage's tissue inputs for ``slide`` (CMU-1's region: 0.499 µm/px) with every
    pixel tissue (an 8x thumbnail mask and its tissue.json): plan.run's ``tissue_png`` and
    ``tissue_json``."""
    from PIL import Image

    from wsiseg.runner import write_json
    from wsiseg.slide import open_slide

    with open_slide(str(slide)) as s:
        thumb_ds = 8.0
        w, h = (int(np.ceil(d / thumb_ds)) for d in s.dimensions)
    Image.fromarray(np.full((h, w), 255, np.uint8)).save(tmp_path / "tissue.png")
    write_json(
        str(tmp_path / "tissue.json"),
        dict(
            slide_id=slide_id,
            method="all",
            thumbnail_downsample=thumb_ds,
            thumbnail_mpp=thumb_ds * 0.499,
            tissue_area_mm2=1.0,
            tissue_fraction=1.0,
        ),
    )
    return dict(tissue_png=str(tmp_path / "tissue.png"), tissue_json=str(tmp_path / "tissue.json"))
