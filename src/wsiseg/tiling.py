"""Tile plan geometry: a regular grid of output tiles at the model's mpp, read with context.

Tile (row, col) writes target px [col*T, col*T+T) x [row*T, row*T+T), clipped to the
slide (coordinate planes: :mod:`wsiseg.geometry`). Each tile has two regions (as in
StarDist's ``big.py``):

    write region -- the ``tile_size`` square (clipped at the slide's right/bottom
                    edge) whose labels this tile owns in the mask
    read window  -- the write region grown by ``margin`` on every side (plus, for
                    networks with input-size constraints, a few px at right/bottom),
                    mirror-extrapolated (reflect) where it leaves the slide

Here: the margin and window for a model (:func:`plan_margin`, :func:`legal_input`,
:func:`tile_spec_for`), the grid (:func:`plan_tiles`) and the plan artefact
(plan.tsv + plan.json) with its one typed reader, :class:`Plan`. The plan *stage*
(the rule 'plan') is :mod:`wsiseg.plan`.

pandas is imported only where a table is made or read as a DataFrame: the plan, segment and
stitch jobs make and read the plan without it (0.3 s of each job's start).
"""

from __future__ import annotations

import csv
import json
import math
from collections import namedtuple
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError
from .geometry import Geometry

if TYPE_CHECKING:
    import pandas as pd


# ------------------------------------------------------------------ tile plan
@dataclass(frozen=True)
class TileSpec:
    """How the network is fed: geometry shared by all tiles of a plan."""

    tile_size: int  # T: write region side, target px
    margin: int  # m: context per side, target px
    window: int  # n: read window side (T + 2m + extra), target px
    out_offset: int  # target px from window origin to the network output's first px
    align: int  # tile origins are multiples of this (2**depth)

    def __post_init__(self):
        assert self.tile_size % self.align == 0, "tile_size must be a multiple of 2**depth"
        assert self.window >= self.tile_size + 2 * self.margin
        assert 0 <= self.out_offset <= self.margin

    @property
    def keep(self) -> slice:
        """Where the write region sits in the network output (both axes)."""
        start = self.margin - self.out_offset
        return slice(start, start + self.tile_size)


PLAN_COLUMNS = ["row", "col", "tx", "ty", "tw", "th", "wx", "wy", "n", "x0", "y0", "w0", "h0", "tissue_fraction"]

#: one row of plan.tsv as :meth:`Plan.read` gives it with ``frame=False`` (ints, and
#: tissue_fraction a float): the attributes of a row of the DataFrame's ``itertuples()``
PlanRow = namedtuple("PlanRow", PLAN_COLUMNS)


def plan_rows(tiles) -> list:
    """The tile plan's rows as named tuples (attributes as :data:`PLAN_COLUMNS`), from a
    DataFrame (:func:`plan_tiles`, ``Plan.read``; ``itertuples`` keeps each column's dtype) or
    from rows already (``Plan.read(..., frame=False)``)."""
    if hasattr(tiles, "itertuples"):
        return list(tiles.itertuples(index=False))
    return list(tiles)


def plan_tiles(geom: Geometry, spec: TileSpec, tissue: np.ndarray | None, tissue_downsample: float) -> pd.DataFrame:
    """:func:`tile_rows` as a DataFrame (columns :data:`PLAN_COLUMNS`)."""
    import pandas as pd

    return pd.DataFrame(tile_rows(geom, spec, tissue, tissue_downsample), columns=PLAN_COLUMNS)


def tile_rows(geom: Geometry, spec: TileSpec, tissue: np.ndarray | None, tissue_downsample: float) -> list:
    """Tile plan: one :data:`PlanRow` per tile that touches tissue (what the plan stage writes,
    without pandas).

    ``tissue`` is a boolean mask where one pixel covers ``tissue_downsample`` level-0 px
    (None: every tile is kept). Columns: tile index (row, col), write region in
    target px (tx, ty, tw, th), read window in target px (wx, wy, n), write
    region in level-0 px (x0, y0, w0, h0) and tissue_fraction of the write region.
    """
    T = spec.tile_size
    rows, cols = math.ceil(geom.height / T), math.ceil(geom.width / T)
    recs = []
    for r in range(rows):
        for c in range(cols):
            tx, ty = c * T, r * T
            tw, th = min(T, geom.width - tx), min(T, geom.height - ty)
            x0, y0 = geom.target_to_level0(tx), geom.target_to_level0(ty)
            w0, h0 = geom.target_to_level0(tw), geom.target_to_level0(th)
            if tissue is None:
                frac = 1.0
            else:
                # tissue pixels whose footprint overlaps the write region
                a0 = int(math.floor(x0 / tissue_downsample))
                a1 = max(a0 + 1, int(math.ceil((x0 + w0) / tissue_downsample)))
                b0 = int(math.floor(y0 / tissue_downsample))
                b1 = max(b0 + 1, int(math.ceil((y0 + h0) / tissue_downsample)))
                sub = tissue[b0:b1, a0:a1]
                frac = float(sub.mean()) if sub.size else 0.0
            if frac <= 0:
                continue
            recs.append(
                PlanRow(
                    row=r,
                    col=c,
                    tx=tx,
                    ty=ty,
                    tw=tw,
                    th=th,
                    wx=tx - spec.margin,
                    wy=ty - spec.margin,
                    n=spec.window,
                    x0=int(round(x0)),
                    y0=int(round(y0)),
                    w0=int(round(w0)),
                    h0=int(round(h0)),
                    tissue_fraction=round(frac, 4),
                )
            )
    return recs


# ------------------------------------------------------------------ the plan artefact
@dataclass
class Plan:
    """plan.tsv (one row per tile) + plan.json (geometry, tile spec, the model it was made
    for): the one reader and writer of the plan artefact.

    ``calibration`` holds what the model's per-slide calibration step measured (e.g. the
    classical model's ``classical_threshold``); it is stored as top-level keys of plan.json.
    """

    tiles: pd.DataFrame | tuple | list  # the table; its rows (tile_rows, read with frame=False); () from read_meta
    geometry: Geometry
    spec: TileSpec
    slide_id: str
    model: str
    model_checksum: str
    halo: int | None
    grid_rows: int
    grid_cols: int
    tissue_downsample: float  # level-0 px per tissue-mask px
    model_classes: list
    mask_classes: list
    postprocess: dict | None
    calibration: dict = field(default_factory=dict)
    elapsed_s: float = 0.0
    n_tiles: int | None = None  # len(tiles); from plan.json when only that was read

    def __post_init__(self):
        if self.n_tiles is None:
            self.n_tiles = len(self.tiles)
        assert self.n_tiles == len(self.tiles) or len(self.tiles) == 0, "plan.tsv and plan.json disagree"

    def write(self, path_tsv: str, path_json: str) -> None:
        if hasattr(self.tiles, "to_csv"):
            self.tiles.to_csv(path_tsv, sep="\t", index=False)
        else:  # rows (tile_rows): the same bytes as pandas writes (ints, floats as str gives them)
            with open(path_tsv, "w") as fh:
                fh.write("\t".join(PLAN_COLUMNS) + "\n")
                fh.writelines("\t".join(map(str, r)) + "\n" for r in self.tiles)
        meta = dict(
            geometry=self.geometry.to_dict(),
            tiles=asdict(self.spec),
            n_tiles=self.n_tiles,
            slide_id=self.slide_id,
            model=self.model,
            model_checksum=self.model_checksum,
            halo=self.halo,
            grid_rows=self.grid_rows,
            grid_cols=self.grid_cols,
            elapsed_s=self.elapsed_s,
            tissue_downsample=self.tissue_downsample,
            model_classes=self.model_classes,
            mask_classes=self.mask_classes,
            postprocess=self.postprocess,
            **self.calibration,
        )
        with open(path_json, "w") as fh:
            json.dump(meta, fh, indent=2)

    @classmethod
    def read_meta(cls, path_json: str) -> Plan:
        """plan.json alone (no tile table: ``tiles`` is ``()``)."""
        return cls._from(path_json, None)

    @classmethod
    def read(cls, path_tsv: str, path_json: str, frame: bool = True) -> Plan:
        """plan.tsv and plan.json; ``tiles`` a DataFrame, or with ``frame=False`` a tuple of
        :data:`PlanRow` read without pandas (the same values)."""
        return cls._from(path_json, path_tsv, frame)

    @classmethod
    def _from(cls, path_json: str, path_tsv: str | None, frame: bool = True) -> Plan:
        with open(path_json) as fh:
            meta = json.load(fh)
        if path_tsv is None:
            tiles = ()
        elif frame:
            import pandas as pd

            tiles = pd.read_csv(path_tsv, sep="\t")
        else:
            tiles = _read_rows(path_tsv)
        known = set(cls.__dataclass_fields__)
        return cls(
            tiles=tiles,
            geometry=Geometry(**meta["geometry"]),
            spec=TileSpec(**meta["tiles"]),
            slide_id=meta["slide_id"],
            model=meta["model"],
            model_checksum=meta["model_checksum"],
            halo=meta.get("halo"),
            grid_rows=meta["grid_rows"],
            grid_cols=meta["grid_cols"],
            tissue_downsample=meta["tissue_downsample"],
            model_classes=meta["model_classes"],
            mask_classes=meta["mask_classes"],
            postprocess=meta.get("postprocess"),
            calibration={k: v for k, v in meta.items() if k not in known and k not in ("geometry", "tiles", "run")},
            elapsed_s=meta.get("elapsed_s", 0.0),
            n_tiles=meta["n_tiles"] if path_tsv is None else None,
        )


def _read_rows(path_tsv: str) -> tuple:
    """plan.tsv's rows as :data:`PlanRow` (every column an int but tissue_fraction)."""
    with open(path_tsv, newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        if header != PLAN_COLUMNS:
            raise ValueError(f"{path_tsv}: columns {header}, expected {PLAN_COLUMNS}; rerun the plan rule")
        return tuple(PlanRow(*map(int, rec[:-1]), float(rec[-1])) for rec in reader)


# ------------------------------------------------------------------ margin and window
def plan_margin(spec, margin, allow_small: bool, log=print) -> int:
    """Context per side (target px). ``margin`` 'auto' covers the halo."""
    step = max(1, spec.align // 2)  # keeps T + 2m a multiple of 2**depth
    if margin in (None, "auto"):
        return max(spec.border, int(math.ceil(spec.halo / step) * step))
    margin = int(margin)
    if margin < spec.border:
        raise ConfigError(
            f"tiling.margin={margin} is smaller than the {spec.border} px that the 'valid' model "
            f"'{spec.name}' loses per side; set tiling.margin to at least {spec.border} (or 'auto')"
        )
    if margin < spec.halo:
        if not allow_small:
            raise ConfigError(
                f"tiling.margin={margin} px is below the receptive-field halo ({spec.halo} px) of model "
                f"'{spec.name}': tiles would disagree at their borders (seams). Set tiling.margin to "
                f"'auto' or >= {spec.halo}, or set tiling.allow_small_margin: true to accept that "
                "(the effective receptive field is often smaller than the theoretical one)"
            )
        log(
            f"WARNING: tiling.margin={margin} px is below the theoretical halo of {spec.halo} px "
            "(allowed by tiling.allow_small_margin); "
            "the mask may differ slightly from a one-pass result near tile borders"
        )
    return margin


def legal_input(model, n_min: int) -> int:
    """Smallest side >= ``n_min`` that ``model`` (a :class:`wsiseg.models.ModelSpec`) accepts."""
    for n in range(n_min, n_min + 4 * model.align + 1):
        if model.output_size(n) is not None:
            return n
    raise ConfigError(f"no legal input size for model '{model.name}' near {n_min}")


def tile_spec_for(model, tile_size: int, margin: int) -> TileSpec:
    """TileSpec for a loaded :class:`wsiseg.models.ModelSpec` with a checked margin."""
    if tile_size % model.align:
        raise ValueError(
            f"tiling.tile_size={tile_size} must be a multiple of {model.align} (2**depth of model '{model.name}')"
        )
    n = legal_input(model, tile_size + 2 * margin)
    return TileSpec(tile_size=tile_size, margin=margin, window=n, out_offset=model.border, align=model.align)
