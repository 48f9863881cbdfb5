"""Outlines: every object of a label mask as a polygon, for QuPath (GeoJSON), streamed tile by tile.

Coordinate systems: *mask px* (the mask's level 0, at the model's mpp; vertex
(x, y) is the corner between pixels, pixel (r, c) spans [c, c + 1) x [r, r + 1))
and *level-0 px* of the slide (mask px x ``scale0``), which is what QuPath and
OpenSlide use. Outlines follow pixel edges exactly, so a polygon's area is the
object's pixel count and rasterising it (pixel centres inside) gives the mask back.

Boundaries are directed unit edges with the object's pixel on their right
(exterior rings have positive shoelace area in x/y, holes negative; this is
RFC 7946's counter-clockwise exteriors). Rings are chained by turning right
first, so 8-connected pixels that touch only at a corner give rings that touch
at that point, never a self-crossing ring; an object whose parts touch only at
corners becomes a MultiPolygon.

Streaming: an object piece that does not touch its tile's edge is complete and
is written at once (to a temporary file, since object ids are known only at the
end). Pieces that touch a tile edge keep their unit edges; once a row of tiles is
done, the objects that cannot grow any more (none of their pieces touches the
row's bottom edge) have their pieces (the stats stage's union-find) merged by
dropping the edges two pieces share, and are traced again and written. Memory:
one tile plus the boundary edges of the objects open along one row of tiles, at
most ``MAX_OPEN_EDGES`` (objects beyond it are written tile piece by tile piece).
"""

from __future__ import annotations

import gzip
import json
import os
import uuid
from collections.abc import Iterator

import numpy as np

from .objects import DECIMALS, first_object_ids, shape_features
from .stitch import PALETTE  # the overlay's class colours, so QuPath shows the same

# directions of a unit edge, turning right in this order (y points down)
DX = np.array([1, 0, -1, 0], np.int64)  # 0 east, 1 south, 2 west, 3 north
DY = np.array([0, 1, 0, -1], np.int64)


def boundary_edges(lab: np.ndarray):
    """Directed unit edges (x, y, d, label) of every region of ``lab`` (0 = none).

    (x, y) is the start vertex in ``lab`` px, d the direction; the pixel on the
    edge's right has ``label``, the one on its left does not. Work is proportional
    to the labelled pixels, not the tile.
    """
    w2 = lab.shape[1] + 2
    p = np.pad(lab, 1).ravel()
    fg = np.flatnonzero(p)  # flat indices (padded) of labelled pixels
    val = p[fg]
    r, c = np.divmod(fg, w2)
    r -= 1
    c -= 1
    xs, ys, ds, ls = [], [], [], []
    # top edge heads east from (c, r); right edge south from (c+1, r); bottom west from
    # (c+1, r+1); left north from (c, r+1)
    for d, (step, sx, sy) in enumerate(((-w2, 0, 0), (1, 1, 0), (w2, 1, 1), (-1, 0, 1))):
        m = p[fg + step] != val
        xs.append(c[m] + sx)
        ys.append(r[m] + sy)
        ds.append(np.full(int(np.count_nonzero(m)), d, np.int8))
        ls.append(val[m])
    return (
        np.concatenate(xs).astype(np.int64),
        np.concatenate(ys).astype(np.int64),
        np.concatenate(ds),
        np.concatenate(ls).astype(np.int64),
    )


def trace(x, y, d, label):
    """Chain unit edges into rings of corner vertices.

    Returns (ring_label, ring_area, offsets, corners, edge_ring): ring i's corners are
    ``corners[offsets[i]:offsets[i + 1]]`` (k x 2, x/y, not closed), its signed
    area is ``ring_area[i]`` (> 0 exterior, < 0 hole), and input edge e lies on ring
    ``edge_ring[e]``.
    """
    n = len(x)
    if n == 0:
        return (
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(1, np.int64),
            np.zeros((0, 2), np.int64),
            np.zeros(0, np.int64),
        )
    x, y = np.asarray(x, np.int64), np.asarray(y, np.int64)
    d = np.asarray(d, np.int64)
    w1 = int(x.max()) + 2
    key = (y * w1 + x) * 4 + d
    order = np.argsort(key, kind="stable")
    skey = key[order]
    assert not np.any(skey[1:] == skey[:-1]), "a directed edge occurs twice"
    ex, ey = x + DX[d], y + DY[d]  # end vertex
    succ = np.full(n, -1, np.int64)
    for turn in (1, 0, 3):  # right, straight, left
        todo = succ < 0
        want = (ey[todo] * w1 + ex[todo]) * 4 + (d[todo] + turn) % 4
        pos = np.minimum(np.searchsorted(skey, want), n - 1)
        hit = skey[pos] == want
        idx = np.flatnonzero(todo)
        succ[idx[hit]] = order[pos[hit]]
    assert (succ >= 0).all(), "an open boundary"
    assert (np.bincount(succ, minlength=n) == 1).all(), "boundary edges do not form rings"
    del key, skey, order, ex, ey, want, pos, hit, idx, todo
    # ring id = smallest edge index on the ring (pointer jumping: after k rounds, the
    # smallest over the next 2**k edges; once a round changes nothing, nothing will)
    ring, j = np.arange(n), succ.copy()
    steps = 1
    while steps < n:
        new = np.minimum(ring, ring[j])
        if np.array_equal(new, ring):
            break
        ring, j = new, j[j]
        steps *= 2
    del j
    # rank along the ring from its first edge: distance to the ring's last edge
    is_first = ring == np.arange(n)
    nxt = np.where(is_first[succ], np.arange(n), succ)
    del is_first
    dist = (nxt != np.arange(n)).astype(np.int64)
    while True:  # until every pointer has reached its ring's last edge (which points at itself)
        nn = nxt[nxt]
        if np.array_equal(nn, nxt):
            break
        dist += dist[nxt]
        nxt = nn
    del nxt, nn, succ
    o = np.lexsort((-dist, ring))  # ring by ring, from each ring's first edge
    del dist
    rid, od = ring[o], d[o]
    start = np.r_[True, rid[1:] != rid[:-1]]
    prev_d = np.r_[od[-1], od[:-1]]
    first_idx = np.flatnonzero(start)
    last_idx = np.r_[first_idx[1:], len(o)] - 1
    prev_d[first_idx] = od[last_idx]  # cyclic within each ring
    corner = od != prev_d
    cx, cy = x[o][corner], y[o][corner]
    ring_of_corner = np.cumsum(start)[corner] - 1
    counts = np.bincount(ring_of_corner, minlength=len(first_idx))
    offsets = np.r_[0, np.cumsum(counts)]
    # signed area (shoelace) per ring
    nx_ = np.empty_like(cx)
    ny_ = np.empty_like(cy)
    nx_[:-1], ny_[:-1] = cx[1:], cy[1:]
    lastc = offsets[1:] - 1
    nx_[lastc], ny_[lastc] = cx[offsets[:-1]], cy[offsets[:-1]]
    area2 = np.bincount(ring_of_corner, weights=(cx * ny_ - nx_ * cy).astype(np.float64), minlength=len(first_idx))
    ring_area = np.round(area2 / 2).astype(np.int64)
    edge_ring = np.empty(n, np.int64)
    edge_ring[o] = np.cumsum(start) - 1
    return label[o][first_idx], ring_area, offsets, np.stack([cx, cy], 1), edge_ring


def ring_components(x, y, d, label, edge_ring, ring_area) -> np.ndarray:
    """Which 4-connected part of its object each ring bounds: an id per ring, shared by
    the part's exterior ring and its holes (exactly one exterior per id).

    A run of an object's pixels along a row starts at a north-going edge and ends at a
    south-going one, and both bound the same part: pairing them, row by row, joins every
    hole to the ring on its left, and so on out to the part's exterior. Linear in the
    number of edges (after a sort), whatever the number of holes and parts.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n_rings = len(ring_area)
    v = np.flatnonzero(np.asarray(d) % 2 == 1)
    row = np.where(d[v] == 1, y[v], y[v] - 1)  # south edge from (x, y) covers row y; north from (x, y) row y - 1
    o = v[np.lexsort((x[v], row, label[v]))]
    starts, ends = o[0::2], o[1::2]
    assert len(starts) == len(ends) and (d[starts] == 3).all() and (d[ends] == 1).all(), "runs do not pair up"
    assert (label[starts] == label[ends]).all()
    g = coo_matrix((np.ones(len(starts), np.int8), (edge_ring[starts], edge_ring[ends])), shape=(n_rings, n_rings))
    _, comp = connected_components(g, directed=False)
    assert (np.bincount(comp, weights=(ring_area > 0), minlength=comp.max() + 1) == 1).all(), (
        "a part without exactly one exterior ring"
    )
    return comp


def geometries(
    ring_label, ring_area, offsets, corners, edge_ring, x, y, d, scale: float, dx: int = 0, dy: int = 0
) -> Iterator[tuple[int, str]]:
    """(label, GeoJSON geometry text) per label of :func:`trace`'s rings (``edge_ring``
    and the edges ``x, y, d`` it traced); vertices (mask px, shifted by dx, dy) times
    ``scale``. One ring (the usual nucleus) takes a fast path; otherwise each part of the
    object is a polygon [exterior, holes...] (:func:`ring_components`), and several parts
    a MultiPolygon."""
    if not len(ring_label):
        return
    pts = (corners + (dx, dy)) * scale
    pts = pts.astype(np.int64) if float(scale).is_integer() else np.round(pts, 2)
    # every vertex as text once ("[x,y]", as json.dumps writes it), then rings are joins
    # of slices: no per-ring encoder, which dominated with millions of tiny hole rings
    vtx = [f"[{a},{b}]" for a, b in pts.tolist()]
    off = offsets.tolist()

    def ring_text(i):
        o0, o1 = off[i], off[i + 1]
        return "[" + ",".join(vtx[o0:o1]) + "," + vtx[o0] + "]"  # closed

    comp = None
    order = np.argsort(ring_label, kind="stable")
    lab = ring_label[order]
    cuts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1], True])
    order_l, lab_l = order.tolist(), lab.tolist()
    for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):
        if b - a == 1:
            yield lab_l[a], '{"type":"Polygon","coordinates":[' + ring_text(order_l[a]) + "]}"
            continue
        if comp is None:
            rl = ring_label[edge_ring]
            comp = ring_components(x, y, d, rl, edge_ring, ring_area)
        idx = order[a:b]
        # one polygon per part: exterior first, then its holes
        idx = idx[np.lexsort((ring_area[idx] < 0, comp[idx]))]
        parts = np.flatnonzero(np.r_[True, comp[idx][1:] != comp[idx][:-1], True])
        idx_l = idx.tolist()
        polys = [
            "[" + ",".join(ring_text(i) for i in idx_l[p0:p1]) + "]"
            for p0, p1 in zip(parts[:-1].tolist(), parts[1:].tolist())
        ]
        if len(polys) == 1:
            yield lab_l[a], '{"type":"Polygon","coordinates":' + polys[0] + "}"
        else:
            yield lab_l[a], '{"type":"MultiPolygon","coordinates":[' + ",".join(polys) + "]}"


#: objects.csv.gz columns each feature also carries as a measurement (QuPath can colour and
#: filter detections by them without a join), rounded as in the table; empty ones are left out
MEASUREMENTS = ("perimeter_um", "circularity", "solidity", "eccentricity", "mean_hematoxylin_od", "mean_eosin_od")

MAX_OPEN_EDGES = 1_000_000  # boundary edges kept for objects still open (13 bytes each; tracing them: 250)
MERGE_BATCH_EDGES = 500_000  # edges traced at once when merging (about 250 bytes each at the peak)


def _batches(x, y, d, key, limit: int = MERGE_BATCH_EDGES):
    """The edges grouped by ``key``, in batches of about ``limit`` edges that never split a key."""
    if not len(x):
        return
    o = np.argsort(key, kind="stable")
    x, y, d, key = x[o], y[o], d[o], key[o]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])  # each key's first edge
    cuts = [0]
    for s0 in starts[np.searchsorted(starts, np.arange(limit, len(x), limit)).clip(max=len(starts) - 1)].tolist():
        if s0 > cuts[-1]:
            cuts.append(s0)
    cuts.append(len(x))
    for a, b in zip(cuts[:-1], cuts[1:]):
        yield x[a:b], y[a:b], d[a:b], key[a:b]


class OutlineCollector:
    """Keeps each object's outline while :func:`wsiseg.objects.count_objects` reads the
    mask (its ``outlines`` argument); :func:`write_geojson` writes them once object ids
    are known.

    Memory is bounded: when the boundaries kept for open objects (those that may still
    grow into the next tiles) exceed ``max_open_edges``, the largest open objects are
    written as they are, one feature per tile piece (``part`` 1, 2, ... with the same
    object_id), and so are their later pieces. No nucleus comes near the default (a
    million px of boundary, 500 mm at 0.5 µm/px; a 20 x 15 mm tissue region has about
    140,000 px); the speckled blob of an untrained model does.
    """

    def __init__(self, tmp_path: str, scale0: float, max_open_edges: int = MAX_OPEN_EDGES):
        self.tmp_path, self.scale0, self.max_open_edges = tmp_path, scale0, max_open_edges
        self._fh = open(tmp_path, "w")
        self._border: list[tuple[np.ndarray, ...]] = []
        self._n_open = 0
        self._split_gids = np.zeros(0, np.int64)  # pieces of objects written piece by piece
        self.roots: np.ndarray | None = None  # set by finish(): the root id of every piece id

    def tile(self, x: int, y: int, lab: np.ndarray, roots=None) -> None:
        """``lab``: the tile's components with global ids (0 = background), tile origin (x, y) in mask px.
        ``roots``: a callable giving the union-find's current root of every id (called only
        when the open boundaries exceed the budget)."""
        ex, ey, ed, el = boundary_edges(lab)
        if not len(ex):
            return
        edge_ids = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        b = np.isin(el, edge_ids[edge_ids > 0])  # pieces touching the tile's edge: may grow
        if b.any():
            # int32 coordinates and int8 directions: 13 bytes an edge while the object is open
            self._border.append(((ex[b] + x).astype(np.int32), (ey[b] + y).astype(np.int32), ed[b], el[b]))
            self._n_open += int(np.count_nonzero(b))
        c = ~b
        self._write(geometries(*trace(ex[c], ey[c], ed[c], el[c]), ex[c], ey[c], ed[c], self.scale0, x, y))
        if self._n_open > self.max_open_edges and roots is not None:
            self._split(roots())

    def _write(self, items, kind: str = "o") -> None:
        """Lines 'kind id geometry': 'o' a whole object or tile-local piece id, 'p' one part of a split object."""
        self._fh.writelines(f"{kind}\t{gid}\t{geom}\n" for gid, geom in items)

    def _open(self):
        x, y, d, gid = (np.concatenate(a) for a in zip(*self._border))
        self._border, self._n_open = [], 0
        return x, y, d, gid

    def _keep(self, x, y, d, gid) -> None:
        if len(x):
            self._border = [(x, y, d, gid)]
            self._n_open = len(x)

    def _write_parts(self, x, y, d, gid) -> None:
        """Pieces as they are (one feature each), traced by piece id; their objects stay split."""
        if len(x):
            self._split_gids = np.union1d(self._split_gids, np.unique(gid))
            for bx, by, bd, bgid in _batches(x, y, d, gid):
                self._write(geometries(*trace(bx, by, bd, bgid), bx, by, bd, self.scale0), "p")

    def _split(self, roots: np.ndarray) -> None:
        """Over budget: write the largest open objects piece by piece until half the budget is left."""
        x, y, d, gid = self._open()
        root = roots[gid]
        u, inv, cnt = np.unique(root, return_inverse=True, return_counts=True)
        order = np.argsort(-cnt, kind="stable")
        left = len(x) - np.cumsum(cnt[order])
        n_split = int(np.searchsorted(-left, -self.max_open_edges // 2)) + 1  # largest first, until under half
        split = np.zeros(len(u), bool)
        split[order[:n_split]] = True
        if len(self._split_gids):
            split |= np.isin(u, roots[self._split_gids])
        s = split[inv]
        self._write_parts(x[s], y[s], d[s], gid[s])
        self._keep(x[~s], y[~s], d[~s], gid[~s])

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def discard(self) -> None:
        """Close and remove the temporary file (the stage failed)."""
        self.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def row_done(self, roots: np.ndarray, frontier: np.ndarray) -> None:
        """A row of tiles is done: objects none of whose pieces touch ``frontier`` (the ids
        of the row's last pixel row) can grow no more; merge, trace and write them now,
        so what is kept is bounded by the objects along one row of tiles."""
        if not self._border:
            return
        self._close_objects(roots, np.unique(roots[frontier[frontier > 0]]))

    def finish(self, roots: np.ndarray) -> None:
        """After the last tile: write every object still open."""
        self.roots = roots
        if self._border:
            self._close_objects(roots, np.zeros(0, np.int64))
        self.close()

    def _close_objects(self, roots: np.ndarray, open_roots: np.ndarray) -> None:
        """Write the pieces of split objects, merge and write the objects not in
        ``open_roots``, keep the rest."""
        x, y, d, gid = self._open()
        root = roots[gid]
        split = np.isin(root, roots[self._split_gids]) if len(self._split_gids) else np.zeros(len(x), bool)
        self._write_parts(x[split], y[split], d[split], gid[split])
        done = ~split & ~np.isin(root, open_roots)
        keep = ~split & ~done
        self._keep(x[keep], y[keep], d[keep], gid[keep])
        if done.any():
            self._write(self._merge(x[done], y[done], d[done], root[done]))

    def _merge(self, x, y, d, root) -> Iterator[tuple[int, str]]:
        """Pieces of each object with the edges two pieces share removed (one segment walked
        both ways), traced again; objects in batches of about ``MERGE_BATCH_EDGES`` edges."""
        for batch in _batches(x, y, d, root):
            yield from self._merge_batch(*batch)

    def _merge_batch(self, x, y, d, root) -> Iterator[tuple[int, str]]:
        # a segment's key: its lower/left end and whether it is vertical
        sx = np.where(d == 2, x - 1, x).astype(np.int64)
        sy = np.where(d == 3, y - 1, y).astype(np.int64)
        seg = (sy * (int(sx.max()) + 2) + sx) * 2 + (d % 2)
        del sx, sy
        o = np.lexsort((seg, root))
        seg, ro = seg[o], root[o]
        dup = (seg[1:] == seg[:-1]) & (ro[1:] == ro[:-1])
        del seg, ro
        drop = np.zeros(len(o), bool)
        drop[1:] |= dup
        drop[:-1] |= dup
        keep = np.sort(o[~drop])
        x, y, d, root = x[keep], y[keep], d[keep], root[keep]
        yield from geometries(*trace(x, y, d, root), x, y, d, self.scale0)

    def outlines(self) -> Iterator[tuple[int, bool, str]]:
        """(id, is a part of a split object, geometry) of everything written; ids are piece
        ids or union-find roots (map them with ``roots``)."""
        self.close()
        with open(self.tmp_path) as fh:
            for line in fh:
                kind, gid, geom = line.rstrip("\n").split("\t", 2)
                yield int(gid), kind == "p", geom


def write_geojson(
    path: str, collector: OutlineCollector, counts: dict, classes: list, mpp: float, slide_id: str
) -> int:
    """Write every object's outline as a QuPath-readable FeatureCollection (gzip when
    ``path`` ends in .gz), atomically. Returns the number of features.

    ``counts`` is :func:`wsiseg.objects.count_objects`' result, run with ``collector``;
    object ids, classes and areas are those of objects.csv.gz. Each feature's id is a
    UUID derived from slide and object id (and part), so a rerun gives the same ids.
    """
    roots = collector.roots
    root_l, oid_l, cls_l, area_l = [], [], [], []
    extra_l = {f: [] for f in MEASUREMENTS}
    first = first_object_ids(counts, len(classes))  # the ids of objects.csv.gz
    for k in range(1, len(classes)):
        o = counts[k]["objects"]
        n_k = len(o["area"])
        root_l.append(o["root"])
        oid_l.append(np.arange(first[k], first[k] + n_k))
        cls_l.append(np.full(n_k, k))
        area_l.append(o["area"] * mpp * mpp)
        features = shape_features(o, mpp)
        for f in MEASUREMENTS:
            extra_l[f].append(features[f] if f in features else o.get(f, np.full(n_k, np.nan)))
    all_roots = np.concatenate(root_l) if root_l else np.zeros(0, np.int64)
    order = np.argsort(all_roots)
    sorted_roots = all_roots[order]
    oid, cls, area = (np.concatenate(a)[order] if a else np.zeros(0) for a in (oid_l, cls_l, area_l))
    extra = [(f, np.concatenate(a)[order], DECIMALS.get(f, 2)) for f, a in extra_l.items() if a]
    tmp = path + ".part"
    ns = uuid.uuid5(uuid.NAMESPACE_URL, "wsiseg:" + slide_id)
    try:
        n, seen = _write_features(
            tmp, path.endswith(".gz"), collector, roots, sorted_roots, oid, cls, area, extra, classes, ns
        )
        if seen != len(all_roots):
            raise AssertionError(f"outlines for {seen} of {len(all_roots)} objects")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        collector.discard()
    return n


def _write_features(tmp, gz, collector, roots, sorted_roots, oid, cls, area, extra, classes, ns) -> tuple[int, int]:
    """(features written, objects that have one or more)."""
    n = 0
    parts = np.zeros(len(sorted_roots), np.int64)  # features so far per object
    with gzip.open(tmp, "wt", compresslevel=6, encoding="utf-8") if gz else open(tmp, "w", encoding="utf-8") as fh:
        fh.write('{"type":"FeatureCollection","features":[\n')
        for gid, is_part, geom in collector.outlines():
            root = int(roots[gid])
            i = int(np.searchsorted(sorted_roots, root))
            assert i < len(sorted_roots) and sorted_roots[i] == root, "an outline without its object"
            parts[i] += 1
            assert is_part or parts[i] == 1, "an object outlined twice"
            k, object_id = int(cls[i]), int(oid[i])
            props = {
                "objectType": "detection",
                "name": f"{classes[k]} {object_id}" + (f" part {parts[i]}" if is_part else ""),
                "classification": {"name": classes[k], "color": PALETTE[k % len(PALETTE)].tolist()},
                "measurements": {"object_id": object_id, "area_um2": round(float(area[i]), 2)},
            }
            for f, v, d in extra:  # rounded as in objects.csv.gz; left out where empty
                if v[i] == v[i]:
                    props["measurements"][f] = round(float(v[i]), d)
            if is_part:
                props["measurements"]["part"] = int(parts[i])
            fid = uuid.uuid5(ns, f"{object_id}/{parts[i]}" if is_part else str(object_id))
            fh.write(
                (",\n" if n else "")
                + '{"type":"Feature","id":"'
                + str(fid)
                + '","geometry":'
                + geom
                + ',"properties":'
                + json.dumps(props, separators=(",", ":"))
                + "}"
            )
            n += 1
        fh.write("\n]}\n")
    return n, int(np.count_nonzero(parts))
