"""Report plots (rules 'report_histograms' and 'report_plots'): the figures of
``snakemake --report report.html`` that a person would rather see than read.

``report_histograms`` (per slide) counts objects.csv.gz's size and shape columns into
fixed bins per class, reading the table in chunks: memory is bounded by the chunk, not
by the slide's objects. ``report_plots`` (archive) draws, from summary.csv and those
histograms summed (memory grows with slides x bins, never with objects):

- slides.svg: objects per mm² of tissue and class area (% of tissue), per slide;
- object_sizes.svg, object_shapes.svg: distributions pooled over the archive and per
  slide, for the columns objects.csv.gz has (shape, stain and spacing columns only where
  the stats stage writes them);
- failed_slides.svg: the failed slides, grouped by reason, with the fix.

Figures are matplotlib SVGs (Snakemake's report shows SVG/PNG results as images; a
Vega-Lite result would not be rendered), written without a date so that the same inputs
give the same bytes.
"""

from __future__ import annotations

import re
import textwrap
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .runner import read_json, write_json
from .stitch import PALETTE

#: slides up to this many are drawn one bar (one labelled row) each; more, as distributions
MAX_LABELLED = 40
CHUNK_ROWS = 200_000  # objects.csv.gz rows read at a time


@dataclass(frozen=True)
class Metric:
    """An objects.csv.gz column histogrammed into fixed bins (the same for every slide, so
    that slides add up). Values outside [lo, hi] count in the end bins; NaN is left out."""

    column: str
    label: str
    lo: float
    hi: float
    bins: int
    log: bool = False

    def edges(self) -> np.ndarray:
        if self.log:
            return np.geomspace(self.lo, self.hi, self.bins + 1)
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def histogram(self, values) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        e = self.edges()
        return np.histogram(np.clip(v[np.isfinite(v)], e[0], e[-1]), e)[0]

    def spec(self) -> dict:
        return dict(lo=self.lo, hi=self.hi, bins=self.bins, log=self.log)


SIZE_METRICS = (
    Metric("area_um2", "area (µm²)", 0.1, 1e6, 70, log=True),
    Metric("equivalent_diameter_um", "equivalent diameter (µm)", 0.1, 1e3, 40, log=True),
    Metric("perimeter_um", "perimeter (µm)", 0.1, 1e5, 60, log=True),
    Metric("major_axis_um", "major axis (µm)", 0.1, 1e4, 50, log=True),
    Metric("minor_axis_um", "minor axis (µm)", 0.1, 1e4, 50, log=True),
)
SHAPE_METRICS = (
    Metric("circularity", "circularity (4πA/P²)", 0.0, 1.5, 60),
    Metric("eccentricity", "eccentricity", 0.0, 1.0, 50),
    Metric("solidity", "solidity", 0.0, 1.0, 50),
    Metric("orientation_deg", "orientation (°, counter-clockwise from x)", -90.0, 90.0, 36),
    Metric("mean_hematoxylin_od", "mean haematoxylin OD", 1e-3, 10.0, 40, log=True),
    Metric("mean_eosin_od", "mean eosin OD", 1e-3, 10.0, 40, log=True),
    Metric("nearest_neighbour_um", "nearest neighbour (µm)", 0.1, 1e4, 50, log=True),
    Metric("neighbours_25um", "neighbours within 25 µm", -0.5, 50.5, 51),
)
METRICS = {m.column: m for m in SIZE_METRICS + SHAPE_METRICS}


# ------------------------------------------------------------- per slide: histograms
def object_histograms(objects_csv: str, chunk_rows: int = CHUNK_ROWS) -> dict:
    """Fixed-bin histograms per class of the :data:`METRICS` columns objects.csv.gz has,
    read ``chunk_rows`` rows at a time: {'objects': {class: n}, 'metrics': {column:
    {'bins': spec, 'counts': {class: [...]}}}}."""
    header = pd.read_csv(objects_csv, nrows=0).columns
    metrics = [m for c, m in METRICS.items() if c in header]
    n = Counter()
    counts = {m.column: {} for m in metrics}
    cols = ["class"] + [m.column for m in metrics]
    for df in pd.read_csv(objects_csv, usecols=cols, chunksize=chunk_rows, dtype={"class": str}):
        for cls, g in df.groupby("class", sort=False):
            n[cls] += len(g)
            for m in metrics:
                h = counts[m.column].setdefault(cls, np.zeros(m.bins, np.int64))
                h += m.histogram(g[m.column].to_numpy())
    return dict(
        objects=dict(n),
        metrics={
            m.column: dict(bins=m.spec(), counts={k: v.tolist() for k, v in counts[m.column].items()}) for m in metrics
        },
    )


def run_histograms(*, objects_csv: str, slide_id: str, out_json: str, log=print) -> dict:
    """report_histograms: work/object_histograms.json of one slide."""
    h = dict(slide_id=slide_id, **object_histograms(objects_csv))
    write_json(out_json, h)
    log(f"{slide_id}: {sum(h['objects'].values())} objects, histograms of {', '.join(h['metrics']) or 'no column'}")
    return h


# -------------------------------------------------------------- archive: the figures
def object_classes(summary: pd.DataFrame) -> list:
    """The object classes of summary.csv's columns (<class>_count with <class>_fraction_of_tissue)."""
    return [
        c[: -len("_count")]
        for c in summary.columns
        if c.endswith("_count") and f"{c[:-6]}_fraction_of_tissue" in summary
    ]


def density(summary: pd.DataFrame, cls: str) -> pd.Series:
    """Objects of ``cls`` per mm² of tissue: <class>_per_mm2 where stats wrote it, else
    <class>_count / tissue_area_mm2 (NaN without tissue)."""
    if f"{cls}_per_mm2" in summary:
        return pd.to_numeric(summary[f"{cls}_per_mm2"], errors="coerce")
    tissue = pd.to_numeric(summary["tissue_area_mm2"], errors="coerce")
    return pd.to_numeric(summary[f"{cls}_count"], errors="coerce") / tissue.where(tissue > 0)


def class_colour(i: int):
    """The overlay's colour of the i-th object class (class index i + 1)."""
    return tuple(PALETTE[(i + 1) % len(PALETTE)] / 255.0)


# A fixed layout, in inches from the figure's top-left corner, sized from the panels and their
# labels (measured with the glyph metrics the SVG is written with): matplotlib's constrained
# layout drew every figure twice, once only to measure it, and took most of report_plots' time.
PT = 1 / 72  # inches per point
EDGE = 0.1  # the figure's margin
SUPTITLE = 0.34  # the figure's title (13 pt) from the top edge, and a gap below it
TITLE = 0.3  # an axes title (10-12 pt) and its pad
XBAND = 0.5  # below an axes: x tick labels (log axes' 10ⁿ the tallest) and the x label
YLABEL = 0.24  # left of the tick labels: a y label (rotated, 10 pt) and its pad
TICK = 7 * PT  # a tick and its pad (3.5 + 3.5 points)
XOVER = 0.3  # room beside an axes for its last x tick label, centred on the edge


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _rect(fig, left, top, width, height) -> list:
    """[left, bottom, width, height] as figure fractions of a box in inches from the top-left corner."""
    w, h = fig.get_size_inches()
    return [left / w, 1 - (top + height) / h, width / w, height / h]


def _suptitle(fig, text: str) -> None:
    fig.suptitle(text, fontsize=13, y=1 - 0.08 / fig.get_size_inches()[1], va="top")


def _text_width(strings, size: float = 10) -> float:
    """Inches of the widest of ``strings`` at ``size`` points, as the SVG writes them (glyphs as paths)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    prop = FontProperties(size=size)
    return max((text_to_path.get_text_width_height_descent(s, prop, ismath=False)[0] for s in strings), default=0) * PT


def _fill(line: str, width: float, size: float) -> str:
    """``line`` broken between words into lines of at most ``width`` inches at ``size`` points (a
    longer word, a line of its own)."""
    out = []
    for word in line.split(" "):
        if out and _text_width([f"{out[-1]} {word}"], size) <= width:
            out[-1] += f" {word}"
        else:
            out.append(word)
    return "\n".join(out)


def _log_xticks(ax) -> None:
    """Ticks of a log x axis (its limits and place set) for a fraction of matplotlib's cost: the
    minor ticks where matplotlib puts them, unlabelled, as one artist of tick marks (matplotlib makes
    five artists per tick, ~40 ticks per axis here: a fifth of report_plots' time for one slide). Major
    ticks as matplotlib's (10ⁿ), or where fewer than two decades are in view, at 0.2, 0.5, 1, 2 ...
    labelled so (matplotlib labels minor ticks there, 2×10⁻¹ 3×10⁻¹ ..., which overlapped)."""
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.markers import TICKDOWN
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    lo, hi = sorted(ax.get_xlim())
    if np.floor(np.log10(hi)) - np.ceil(np.log10(lo)) < 1:  # matplotlib would label minor ticks, 2×10⁻¹ ...
        for subs in ((1.0, 2.0, 5.0), np.arange(1.0, 10.0)):  # the first that puts two ticks in view
            major = LogLocator(subs=subs)
            ticks = major.tick_values(lo, hi)
            if np.count_nonzero((ticks >= lo) & (ticks <= hi)) >= 2:
                break
        ax.xaxis.set_major_locator(major)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    minor = ax.xaxis.get_minorticklocs()
    minor = minor[(minor >= lo) & (minor <= hi)]  # matplotlib leaves out those beyond the limits when it draws
    ax.xaxis.set_minor_locator(NullLocator())
    rc = matplotlib.rcParams
    marks = Line2D(minor, np.zeros(len(minor)), linestyle="none", marker=TICKDOWN, color=rc["xtick.color"])
    marks.set(markersize=rc["xtick.minor.size"], markeredgewidth=rc["xtick.minor.width"], clip_on=False)
    marks.set_transform(ax.get_xaxis_transform())
    ax.add_artist(marks)


def _tick_width(axis, size: float = 10) -> float:
    """Inches of ``axis``'s widest major tick label, as its locator and formatter give them for its
    limits (the ticks that will be drawn, without drawing them)."""
    locs = np.asarray(axis.get_majorticklocs(), float)
    labels = axis.get_major_formatter().format_ticks(locs)
    lo, hi = sorted(axis.get_view_interval())
    tol = 1e-9 * (hi - lo)
    return _text_width([t for x, t in zip(locs, labels) if lo - tol <= x <= hi + tol], size)


def _save(fig, path: str) -> None:
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "wsiseg", "svg.fonttype": "path"}):
        fig.savefig(path, format="svg", metadata={"Date": None})


def _message(title: str, text: str):
    """A figure that says why there is nothing to plot."""
    fig = _figure(9, 2.2)
    fig.suptitle(title, fontsize=13, x=0.02, ha="left")
    fig.text(0.02, 0.5, textwrap.fill(text, 110), va="center", fontsize=10)
    return fig


def _status(summary: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    ok = summary["status"].astype(str) == "ok"
    return summary[ok], summary[~ok]


def plot_slides(summary: pd.DataFrame):
    """slides.svg: per class, objects per mm² of tissue (one panel each), and the classes'
    area as % of tissue (last panel), one bar per slide in summary.csv's order (failed
    slides marked); above :data:`MAX_LABELLED` slides, the distribution of those per-slide
    values over the archive."""
    classes = object_classes(summary)
    ok, failed = _status(summary)
    title = f"{len(ok)} slide{'s' * (len(ok) != 1)} processed" + (f", {len(failed)} failed" if len(failed) else "")
    if not classes or ok.empty:
        return _message("Objects per slide", f"{title}: no slide with object counts to plot.")
    dens = {c: density(summary, c) for c in classes}
    frac = {c: 100 * pd.to_numeric(summary[f"{c}_fraction_of_tissue"], errors="coerce") for c in classes}
    n = len(summary)
    labelled = n <= MAX_LABELLED
    ncols = len(classes) + 1
    fig = _figure(5.0 * ncols, 1.8 + (0.3 * n if labelled else 3.0))
    _suptitle(fig, f"Objects per slide: {title}")
    top, height = SUPTITLE + TITLE, fig.get_size_inches()[1] - SUPTITLE - TITLE - XBAND - EDGE
    axes = []
    for _ in range(ncols):  # placed across once their tick labels are known (below)
        axes.append(fig.add_axes(_rect(fig, 0, top, 1, height), sharey=axes[0] if labelled and axes else None))
    is_ok = summary["status"].astype(str).eq("ok").to_numpy()
    if labelled:
        y = np.arange(n)
        for ax, c in zip(axes, classes):
            v = dens[c].where(is_ok).to_numpy()
            ax.barh(y, np.nan_to_num(v), color=class_colour(classes.index(c)))
            med = np.nanmedian(v) if np.isfinite(v).any() else np.nan
            if np.isfinite(med):
                ax.axvline(med, color="0.3", ls="--", lw=1, label=f"median {med:.4g}")
                ax.legend(loc="lower right", fontsize=8)
            ax.set_xlabel("objects per mm² of tissue")
            ax.set_title(f"{c} density", y=1)
        left = np.zeros(n)
        ax = axes[-1]
        for i, c in enumerate(classes):
            v = np.nan_to_num(frac[c].where(is_ok).to_numpy())
            ax.barh(y, v, left=left, color=class_colour(i), label=c)
            left += v
        ax.set_xlabel("area, % of tissue")
        ax.set_title("class area fraction", y=1)
        if len(classes) > 1:
            ax.legend(loc="lower right", fontsize=8)
        for ax in axes:
            for k in np.flatnonzero(~is_ok):
                ax.text(0, k, "  failed", va="center", ha="left", color="0.45", style="italic", fontsize=8)
        axes[0].set_yticks(y, summary["slide_id"].astype(str))
        axes[0].invert_yaxis()
        for ax in axes[1:]:
            ax.tick_params(labelleft=False)
        lefts = [_text_width(summary["slide_id"].astype(str)) + TICK] + [0.0] * (ncols - 1)
    else:
        ids, ends = summary["slide_id"].astype(str), []
        for ax, c in zip(axes, classes):
            v = dens[c][is_ok].dropna().sort_values(kind="stable")
            ax.hist(v, bins=30, color=class_colour(classes.index(c)))
            ax.axvline(v.median(), color="0.3", ls="--", lw=1, label=f"median {v.median():.4g}")
            ax.legend(loc="upper right", fontsize=8)
            ax.set_xlabel("objects per mm² of tissue")
            ax.set_ylabel("slides")
            ax.set_title(f"{c} density", y=1)
            low, high = ", ".join(ids[v.index[:3]]), ", ".join(ids[v.index[-3:][::-1]])
            ends.append((ax, f"lowest: {low}", f"highest: {high}"))
        ax = axes[-1]
        values = {c: frac[c][is_ok].dropna() for c in classes}
        bins = np.histogram_bin_edges(pd.concat(list(values.values())), bins=30)  # the same bins for every class
        for i, c in enumerate(classes):
            ax.hist(values[c], bins=bins, histtype="step", lw=1.5, color=class_colour(i), label=c)
        ax.set_xlabel("area, % of tissue")
        ax.set_ylabel("slides")
        ax.set_title("class area fraction", y=1)
        ax.legend(loc="upper right", fontsize=8)
        lefts = [YLABEL + _tick_width(ax.yaxis) + TICK for ax in axes]
    width = (5.0 * ncols - EDGE - sum(lefts) - XOVER * ncols) / ncols
    if not labelled:  # the lowest and highest slides' ids, broken into lines as wide as the panel
        for ax, *lines in ends:
            text = "\n".join(_fill(s, 0.95 * width, 8) for s in lines)
            ax.text(0.98, 0.75, text, transform=ax.transAxes, ha="right", va="top", fontsize=8, color="0.25")
    # across: each panel's y tick labels (and label) to its left, room for x tick labels between panels
    x = EDGE
    for ax, lw in zip(axes, lefts):
        ax.set_position(_rect(fig, x + lw, top, width, height))
        x += lw + width + XOVER
    return fig


@dataclass
class Distributions:
    """Per-slide histograms of one archive, summed and stacked for the figures."""

    rows: list  # (slide_id, class) of each per-slide row
    counts: dict  # column -> array (rows x bins)
    left_out: list  # slides whose histograms had other bins (made by another version)

    @classmethod
    def read(cls, paths: list, log=print) -> Distributions:
        rows, per_row, left_out = [], {}, []
        for p in paths:
            h = read_json(p)
            sid = h["slide_id"]
            if any(m in METRICS and v["bins"] != METRICS[m].spec() for m, v in h["metrics"].items()):
                left_out.append(sid)
                log(f"WARNING: {p} has other bins than this version's: left out (rerun -R report_histograms)")
                continue
            classes = list(h["objects"]) or [""]
            for c in classes:
                k = len(rows)
                rows.append((sid, c))
                for col, v in h["metrics"].items():
                    if col in METRICS and c in v["counts"]:  # as numpy at once: ~8 bytes per bin, not a list of ints
                        per_row.setdefault(col, {})[k] = np.asarray(v["counts"][c], np.int64)
        counts = {}
        for col, got in per_row.items():
            a = np.zeros((len(rows), METRICS[col].bins), np.int64)
            for k, v in got.items():
                a[k] = v
            counts[col] = a
        return cls(rows=rows, counts=counts, left_out=left_out)

    def classes(self) -> list:
        return list(dict.fromkeys(c for _, c in self.rows if c))

    def drawn(self, metrics) -> list:
        """The metrics of ``metrics`` these histograms have values of (a column left empty, e.g. the
        colour of objects whose slide was not read, is not drawn)."""
        return [m for m in metrics if m.column in self.counts and self.counts[m.column].any()]


def _median_of(counts: np.ndarray, edges: np.ndarray, log: bool) -> float:
    """The median of a histogram, interpolated within its bin (log bins: geometrically)."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, total / 2))
    f = (total / 2 - (cum[i] - counts[i])) / counts[i]
    lo, hi = edges[i], edges[i + 1]
    return float(lo * (hi / lo) ** f) if log else float(lo + f * (hi - lo))


def plot_distributions(dist: Distributions, metrics, title: str, missing: str):
    """One row per metric of ``metrics`` that the histograms have (:meth:`Distributions.drawn`):
    left, pooled over all slides (% of objects, per class); right, per slide (each row: %
    of that slide's objects). Without any, a figure saying ``missing``."""
    present = dist.drawn(metrics)
    if not present:
        return _message(title, missing)
    classes = dist.classes()
    many = len(classes) > 1
    labels = [f"{s} · {c}" if many and c else s for s, c in dist.rows]
    n = len(dist.rows)
    labelled = n <= MAX_LABELLED
    row_h = max(2.4, min(7.0, 1.0 + 0.2 * n)) if labelled else 3.0
    fig = _figure(12, 0.8 + row_h * len(present))
    head = f"{title}: {n} slide{'s' * (n != 1)}" if not many else f"{title}: {n} slide · class rows"
    if dist.left_out:
        head += f" ({len(dist.left_out)} left out: histograms of another version)"
    _suptitle(fig, head)
    # rows of (pooled, per slide, colour bar), placed across once their tick labels are known (below)
    pitch = (fig.get_size_inches()[1] - SUPTITLE - EDGE) / len(present)
    height = pitch - TITLE - XBAND
    tops = [SUPTITLE + TITLE + i * pitch for i in range(len(present))]
    axes = [[fig.add_axes(_rect(fig, 0, t, 1, height)) for _ in range(2)] for t in tops]
    bars = []
    for (ax, axs), m in zip(axes, present):
        e = m.edges()
        c = dist.counts[m.column]
        nz = np.flatnonzero(c.sum(0))
        x0, x1 = (e[max(nz[0] - 1, 0)], e[min(nz[-1] + 2, m.bins)]) if len(nz) else (e[0], e[-1])
        for i, cls in enumerate(classes):
            rows = [k for k, (_, rc) in enumerate(dist.rows) if rc == cls]
            pooled = c[rows].sum(0)
            if pooled.sum() == 0:
                continue
            med = _median_of(pooled, e, m.log)
            ax.stairs(100 * pooled / pooled.sum(), e, color=class_colour(i), lw=1.5, label=f"{cls}: median {med:.3g}")
        ax.set_xlim(x0, x1)
        if m.log:
            ax.set_xscale("log")
            axs.set_xscale("log")
        ax.set_xlabel(m.label)
        ax.set_ylabel("% of objects")
        ax.set_title(f"{m.label}: all slides, {int(c.sum())} objects", fontsize=10, y=1)
        ax.legend(loc="upper right", fontsize=8)
        tot = c.sum(1, keepdims=True)
        pct = np.divide(100.0 * c, tot, out=np.zeros(c.shape), where=tot > 0)
        mesh = axs.pcolormesh(e, np.arange(n + 1), pct, cmap="viridis", rasterized=True)
        axs.set_xlim(x0, x1)
        axs.set_ylim(n, 0)
        if labelled:
            axs.set_yticks(
                np.arange(n) + 0.5, [f"{s} (no objects)" if t == 0 else s for s, t in zip(labels, tot[:, 0])]
            )
            axs.tick_params(axis="y", labelsize=8)
        else:
            axs.set_ylabel("slides")
        axs.set_xlabel(m.label)
        axs.set_title(f"{m.label}: per slide", fontsize=10, y=1)
        bars.append(fig.colorbar(mesh, cax=fig.add_axes(_rect(fig, 0, 0, 1, 1)), label="% of the slide's objects"))
    # across: pooled | per slide (1.25 times as wide, less where a pooled title needs the room) | colour bar
    # 90% as high; each after its tick labels
    pooled_left = EDGE + YLABEL + max(_tick_width(ax.yaxis) for ax, _ in axes) + TICK
    if labelled:
        slide_left = _text_width([t.get_text() for t in axes[0][1].get_yticklabels()], 8) + TICK
    else:
        slide_left = YLABEL + max(_tick_width(axs.yaxis) for _, axs in axes) + TICK
    bar_w, bar_pad = 0.12, 0.15
    bar_right = bar_pad + bar_w + TICK + max(_tick_width(b.ax.yaxis) for b in bars) + YLABEL + EDGE
    room = 12 - pooled_left - XOVER - slide_left - bar_right
    # the pooled panels' titles may reach over their tick labels, not over the figure's edge or the next panel
    reach = min(pooled_left - EDGE, XOVER + slide_left - 0.05)
    titles = _text_width([ax.get_title() for ax, _ in axes]) - 2 * reach
    w = min(max(room / 2.25, titles), room / 1.5)
    for (ax, axs), b, top, m in zip(axes, bars, tops, present):
        ax.set_position(_rect(fig, pooled_left, top, w, height))
        x = pooled_left + w + XOVER + slide_left
        axs.set_position(_rect(fig, x, top, room - w, height))
        b.ax.set_position(_rect(fig, x + room - w + bar_pad, top + 0.05 * height, bar_w, 0.9 * height))
        if m.log:  # the number of ticks depends on the axes' width: now known
            _log_xticks(ax)
            _log_xticks(axs)
    return fig


def failure_reason(error: str, slide_id: str) -> tuple[str, str]:
    """(reason, fix) of a failed slide's error ("slide 'x': <problem>. Fix: <fix>"): the
    problem without its per-slide details (parentheses of 12 or more characters, and what
    follows ': ' or ', region '), so that slides failing the same way group together; for
    another kind of message, its first line."""
    text = str(error or "").strip() or "no error recorded"
    text = re.sub(rf"^slide '{re.escape(slide_id)}': ", "", text)
    problem, _, fix = text.partition(". Fix: ")
    problem = re.sub(r" \([^)]{12,}\)", "", problem.splitlines()[0])
    reason = re.split(r": |, region ", problem, maxsplit=1)[0].strip()
    return reason[:150], fix.strip()


def failure_groups(summary: pd.DataFrame) -> tuple[dict, dict]:
    """({reason: [slide_id, ...]}, {reason: fix}) of summary.csv's failed slides, the most
    frequent reason first; each reason starts with the stage that failed (summary.csv's
    'failed_stage', as aggregate writes it), so that the same words from two stages stay
    apart."""
    groups, fixes = {}, {}
    _, failed = _status(summary)
    for r in failed.itertuples(index=False):
        sid = str(r.slide_id)
        reason, fix = failure_reason(getattr(r, "error", ""), sid)
        stage = getattr(r, "failed_stage", None)
        if isinstance(stage, str) and stage:
            reason = f"{stage}: {reason}"
        groups.setdefault(reason, []).append(sid)
        fixes.setdefault(reason, fix)
    order = sorted(groups, key=lambda k: (-len(groups[k]), k))
    return {k: groups[k] for k in order}, fixes


def plot_failed(summary: pd.DataFrame):
    """failed_slides.svg: one bar per reason (:func:`failure_groups`), and beside it the
    slides that failed that way and the fix."""
    ok, failed = _status(summary)
    if failed.empty:
        return _message("Failed slides", f"None: all {len(ok)} slides of the sheet were processed.")
    groups, fixes = failure_groups(summary)
    order = list(groups)
    fig = _figure(13, 1.2 + 0.9 * len(order))
    _suptitle(fig, f"Failed slides: {len(failed)} of {len(summary)} (each one's message: summary.csv, 'error')")
    # bars | text, 1:5 across, between the title and the bars' x tick labels and label
    height = fig.get_size_inches()[1] - SUPTITLE - XBAND - EDGE
    w = (13 - 2 * EDGE - XOVER) / 6
    ax = fig.add_axes(_rect(fig, EDGE, SUPTITLE, w, height))
    text = fig.add_axes(_rect(fig, EDGE + w + XOVER, SUPTITLE, 5 * w, height), sharey=ax)
    y = np.arange(len(order))
    counts = [len(groups[k]) for k in order]
    bars = ax.barh(y, counts, color=(0.75, 0.2, 0.2))
    ax.bar_label(bars, padding=3, fontsize=9)
    ax.set_yticks([])
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set_xlim(0, max(counts) * 1.25)
    ax.set_xlabel("slides")
    ax.xaxis.get_major_locator().set_params(integer=True)
    text.axis("off")
    for k, reason in enumerate(order):
        s = groups[reason]
        names = ", ".join(s[:8]) + (f" and {len(s) - 8} more" if len(s) > 8 else "")
        text.text(0, k - 0.18, textwrap.shorten(reason, 110), va="center", fontsize=10, fontweight="bold")
        detail = "slides: " + textwrap.shorten(names, 120)
        if fixes[reason]:
            detail += "\nfix: " + textwrap.shorten(fixes[reason], 120)
        text.text(0, k + 0.05, detail, va="top", fontsize=9, linespacing=1.4)
    return fig


def run_plots(*, summary_csv: str, histograms: list, out: dict, log=print) -> None:
    """report_plots: the archive's figures (``out``: slides, sizes, shapes, failed -> .svg)."""
    summary = pd.read_csv(summary_csv, dtype={"slide_id": str})
    dist = Distributions.read(list(histograms), log)
    shapes_missing = (
        "objects.csv.gz of these slides has no shape columns ("
        + ", ".join(m.column for m in SHAPE_METRICS)
        + "): made by a version of the stats stage that did not measure them."
    )
    _save(plot_slides(summary), out["slides"])
    _save(plot_distributions(dist, SIZE_METRICS, "Object sizes", "No objects.csv.gz with size columns."), out["sizes"])
    _save(plot_distributions(dist, SHAPE_METRICS, "Object shapes", shapes_missing), out["shapes"])
    _save(plot_failed(summary), out["failed"])
    n_failed = int((summary["status"].astype(str) != "ok").sum())
    sizes, shapes = (", ".join(m.column for m in dist.drawn(ms)) or "-" for ms in (SIZE_METRICS, SHAPE_METRICS))
    log(f"{len(summary)} slides ({n_failed} failed); sizes: {sizes}; shapes: {shapes} -> {', '.join(out.values())}")
