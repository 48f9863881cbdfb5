"""Segment: stream the tile plan through the network, keep each tile's write region.

Splitter/merger split as in MONAI: :class:`TileDataset` yields (window, tile
index); a merger has ``aggregate(tile, output, keep)`` and ``finalize()``, where
``output`` is the network's output over the whole read window and ``keep`` the
slice of it that is the tile's write region. :class:`StoreMerger` writes each
tile's labels (the model's per-tile post-processing,
:meth:`wsiseg.models.ModelSpec.tile_labels`) into a :class:`TileStore`, the
workflow's intermediate.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from .errors import SlideError
from .geometry import Geometry, read_window
from .slide import open_slide
from .store import TileStore
from .tiling import TileSpec
from .unet import softmax_tta

log = logging.getLogger("wsiseg.segment")


class TileDataset(Dataset):
    """Read windows of the plan. Each DataLoader worker opens its own slide handle once."""

    def __init__(self, slide_path: str, slide_name: str, mpp: float | None, geom: Geometry, plan: pd.DataFrame):
        self.slide_path, self.slide_name, self.mpp = slide_path, slide_name, mpp
        self.geom = geom
        self.windows = plan[["wx", "wy", "n"]].to_numpy(np.int64)
        self._slide = None
        self._owner = None

    def __len__(self) -> int:
        return len(self.windows)

    def _handle(self):
        info = get_worker_info()
        owner = info.id if info is not None else -1
        if self._slide is None or self._owner != owner:
            self._slide = open_slide(self.slide_path, self.slide_name, self.mpp)
            self._owner = owner
        return self._slide

    def __getitem__(self, i: int):
        """(window as 3 x n x n float in [0, 1], plan row, error message or '')."""
        wx, wy, n = self.windows[i]
        try:
            img = read_window(self._handle(), self.geom, int(wx), int(wy), int(n))
        except SlideError as exc:
            # a corrupt tile: OpenSlide's handle stays in an error state, so reopen it
            if self._slide is not None:
                self._slide.close()
            self._slide = None
            return torch.zeros(3, int(n), int(n)), i, exc.problem
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))) / 255.0
        return x, i, ""


def argmax_labels(out: torch.Tensor, keep: slice, th: int, tw: int) -> np.ndarray:
    """The class of highest score over a tile's write region (no post-processing)."""
    return out[:, keep, keep].argmax(0).to(torch.uint8).cpu().numpy()[:th, :tw]


class StoreMerger:
    """Labels of each write region into a chunked store (chunk = tile).

    ``labels(out, keep, th, tw)`` turns a window's output into the write region's uint8
    labels (the model's :meth:`~wsiseg.models.ModelSpec.tile_labels`; default: argmax).
    ``tissue`` (a boolean mask, one px per ``tissue_downsample`` level-0 px) clips them.
    """

    def __init__(self, path: str, geom: Geometry, spec: TileSpec, tissue=None, tissue_downsample: float = 1.0,
                 labels=argmax_labels):
        self.store = TileStore.create(path, geom.height, geom.width, spec.tile_size)
        self.geom, self.spec = geom, spec
        self.tissue, self.tissue_downsample = tissue, tissue_downsample
        self.labels = labels

    def aggregate(self, tile, out: torch.Tensor, keep: slice) -> None:
        labels = self.labels(out, keep, int(tile.th), int(tile.tw))
        if self.tissue is not None:
            labels = labels * self._tissue_in(tile)
        self.store.write_chunk(int(tile.row), int(tile.col), labels)

    def _tissue_in(self, tile) -> np.ndarray:
        """Tissue mask (nearest) over the write region, in target px."""
        s = self.geom.scale0 / self.tissue_downsample  # tissue px per target px
        ys = np.minimum(((np.arange(tile.ty, tile.ty + tile.th) + 0.5) * s).astype(np.int64), self.tissue.shape[0] - 1)
        xs = np.minimum(((np.arange(tile.tx, tile.tx + tile.tw) + 0.5) * s).astype(np.int64), self.tissue.shape[1] - 1)
        return self.tissue[np.ix_(ys, xs)].astype(np.uint8)

    def finalize(self) -> TileStore:
        return self.store


def pick_device(requested: str, log_fn=log.info) -> torch.device:
    """'auto' -> CUDA when available; 'cuda' without CUDA falls back to CPU with a warning."""
    if requested in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return torch.device("cuda")
    # a scheduler that gave this job a GPU says so (SLURM sets CUDA_VISIBLE_DEVICES for --gpus)
    granted = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    granted = f" (the job was given GPU {granted})" if granted not in ("", "-1", "NoDevFiles") else ""
    if requested in ("cuda", "gpu") or (requested == "auto" and granted):
        log_fn(f"WARNING: a GPU was requested{granted} but CUDA is not available here; running the model on the CPU")
    return torch.device("cpu")


def run_segmentation(
    slide_path: str,
    slide_name: str,
    mpp: float | None,
    geom: Geometry,
    spec: TileSpec,
    plan: pd.DataFrame,
    model: torch.nn.Module,
    merger,
    device: torch.device,
    batch_size: int = 8,
    workers: int = 0,
    amp: bool = True,
    log_fn=log.info,
    log_every_s: float = 10.0,
    max_unreadable_fraction: float = 0.0,
    unreadable: list | None = None,
    tta: bool = False,
):
    """Run ``model`` over every tile of ``plan``; hand each tile's kept output to ``merger``.

    With ``tta`` each window goes through the model in its 8 flips/rotations and the
    merger gets the log of the averaged probabilities (argmax and softmax as for
    logits), 8 times the work for smoother, more accurate masks.

    A tile whose pixels cannot be decoded is left as background (0), logged and
    appended to ``unreadable`` as (row, col, message); if more than
    ``max_unreadable_fraction`` of the tiles are unreadable the slide fails.
    """
    unreadable = [] if unreadable is None else unreadable
    model = model.to(device).eval()
    ds = TileDataset(slide_path, slide_name, mpp, geom, plan)
    loader = DataLoader(
        ds, batch_size=batch_size, num_workers=workers, shuffle=False,
        pin_memory=device.type == "cuda", persistent_workers=False,
        prefetch_factor=2 if workers else None,
    )
    keep = spec.keep
    use_amp = amp and device.type == "cuda"
    t0 = last = time.monotonic()
    done = 0
    rows = list(plan.itertuples(index=False))  # keeps each column's dtype
    with torch.inference_mode():
        for x, idx, errors in loader:
            x = x.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                out = torch.log(softmax_tta(model, x).clamp_min(1e-12)) if tta else model(x)
            out = out.float()
            assert out.shape[-1] >= keep.stop and out.shape[-2] >= keep.stop, (
                f"model output {tuple(out.shape[-2:])} does not cover the write region {keep}"
            )
            for j, i in enumerate(idx.tolist()):
                tile = rows[i]
                if errors[j]:
                    unreadable.append((int(tile.row), int(tile.col), errors[j]))
                    log_fn(f"WARNING {slide_name}: tile row {tile.row} col {tile.col} (level-0 x={tile.x0} "
                           f"y={tile.y0}) could not be read and is left as background: {errors[j]}")
                    if len(unreadable) > max_unreadable_fraction * len(ds):
                        raise SlideError(
                            slide_name,
                            f"{len(unreadable)} of {len(ds)} tiles could not be decoded, more than "
                            f"tiling.max_unreadable_fraction={max_unreadable_fraction:g} allows (first: tile row "
                            f"{unreadable[0][0]} col {unreadable[0][1]}: {unreadable[0][2]})",
                            "the file is damaged: re-export or re-scan it, or raise tiling.max_unreadable_fraction "
                            "to accept unreadable regions as background",
                        )
                    continue
                merger.aggregate(tile, out[j], keep)
            done += len(idx)
            now = time.monotonic()
            if now - last >= log_every_s or done == len(ds):
                rate = done / max(now - t0, 1e-9)
                eta = (len(ds) - done) / max(rate, 1e-9)
                log_fn(f"{slide_name}: {done}/{len(ds)} tiles ({100 * done / max(len(ds), 1):.0f}%), "
                       f"{rate:.2f} tiles/s, eta {math.ceil(eta)} s")
                last = now
    return merger.finalize()


def run(*, slide_path: str, slide_id: str, mpp, plan_tsv: str, plan_json: str, tissue_png: str, model_cfg: dict,
        tiling_cfg: dict, device: str, clip_to_tissue: bool, out_store: str, out_json: str, threads: int = 1,
        log=log.info) -> dict:
    """Segment stage: labels of every planned tile into a chunked store."""
    from .models import load_model
    from .runner import write_json
    from .tiling import Plan
    from .tissue import load_mask

    t0 = time.monotonic()
    torch.set_num_threads(max(1, int(threads)))
    model = load_model(model_cfg, device="cpu", geometry=False)  # geometry comes from the plan
    dev = pick_device(device, log) if model.wants_gpu else torch.device("cpu")
    plan = Plan.read(plan_tsv, plan_json)
    if plan.model_checksum != model.checksum:
        raise RuntimeError("the tile plan was made for other model weights; rerun the plan rule")
    tiles = plan.tiles if model.apply_calibration(plan.calibration, log) else plan.tiles.iloc[:0]
    tissue = load_mask(tissue_png) if clip_to_tissue else None
    geom, spec = plan.geometry, plan.spec
    merger = StoreMerger(out_store, geom, spec, tissue, plan.tissue_downsample, labels=model.tile_labels)
    if model.postprocess:
        log(f"instance post-processing per tile: {model.postprocess} (mask classes {model.mask_classes})")
    tta = bool(model_cfg.get("tta", False)) and model.supports_tta
    log(f"{slide_id}: {len(tiles)} tiles of {spec.window} px on {dev} "
        f"(batch {tiling_cfg['batch_size']}, {tiling_cfg['workers']} workers, amp={dev.type == 'cuda'}, "
        f"tta={'8 flips/rotations' if tta else 'off'})")
    unreadable = []
    run_segmentation(slide_path, slide_id, mpp, geom, spec, tiles, model.module, merger, dev,
                     batch_size=int(tiling_cfg["batch_size"]), workers=int(tiling_cfg["workers"]),
                     amp=bool(tiling_cfg.get("amp", True)), log_fn=log,
                     max_unreadable_fraction=float(tiling_cfg.get("max_unreadable_fraction", 0.01)),
                     unreadable=unreadable, tta=tta)
    merger.store.close()
    elapsed = time.monotonic() - t0
    info = dict(slide_id=slide_id, device=str(dev), tta=tta, n_tiles=len(tiles), elapsed_s=elapsed,
                tiles_per_s=len(tiles) / max(elapsed, 1e-9), tiles_unreadable=len(unreadable),
                unreadable=[dict(row=r, col=c, error=e) for r, c, e in unreadable])
    write_json(out_json, info)
    return info
