"""Tile boxes → scene pixels → CRS, and cross-tile duplicate removal. Pure numpy.

Boxes are ``(x0, y0, x1, y1)`` in pixel-edge coordinates: a box covering columns 10..19 is
``x0=10, x1=20``, and ``(0, 0)`` is the upper-left corner of the upper-left pixel, the same
convention as the raster's affine transform, so corners map with no half-pixel shift.

Duplicate removal is exact greedy NMS (same result as sorting by score and suppressing in
turn), computed over the sparse graph of boxes that actually overlap: a grid hash finds the
pairs, so the cost grows with the number of boxes, not its square. It always runs in scene
pixels: CRS coordinates around 10^6 would lose the precision NMS needs in float32.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

Metric = Literal["iou", "ios"]

# A box cut by an inner tile edge is dropped when at least this fraction of its area lies
# inside a whole (uncut) box of the same class from a neighbouring tile.
CUT_COVERED_FRACTION = 0.5

# Pixels by which the zones that two neighbouring tiles report overlap (see core_margin).
CORE_SLACK = 4.0

# Scores are ordered in steps of this (NMS, the merge, the rows): far below any difference
# in confidence that means something, 25x the rounding that differs between layouts.
SCORE_STEP = 2.0**-16

_UNDECIDED, _KEPT, _SUPPRESSED = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Per tile
# --------------------------------------------------------------------------------------------


def valid_fraction(boxes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Fraction of each box's pixels that are valid, from an ``H×W`` 0/1 mask.

    Uses an integral image, so the cost is one pass over the mask plus O(1) per box.
    """
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.float32)
    height, width = valid.shape
    integral = np.zeros((height + 1, width + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(valid.astype(np.int64), axis=0), axis=1)
    x0 = np.clip(np.floor(boxes[:, 0]), 0, width).astype(np.int64)
    y0 = np.clip(np.floor(boxes[:, 1]), 0, height).astype(np.int64)
    x1 = np.clip(np.ceil(boxes[:, 2]), 0, width).astype(np.int64)
    y1 = np.clip(np.ceil(boxes[:, 3]), 0, height).astype(np.int64)
    x1 = np.maximum(x1, x0 + 1).clip(max=width)
    y1 = np.maximum(y1, y0 + 1).clip(max=height)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    return (total / area).astype(np.float32)


def touches_inner_edge(
    boxes: np.ndarray,
    tile_width: int,
    tile_height: int,
    inner: tuple[bool, bool, bool, bool],
    tolerance: float,
) -> np.ndarray:
    """Which boxes (tile pixels) reach an inner edge (left, top, right, bottom) of their tile."""
    left, top, right, bottom = inner
    cut = np.zeros(len(boxes), dtype=bool)
    if left:
        cut |= boxes[:, 0] <= tolerance
    if top:
        cut |= boxes[:, 1] <= tolerance
    if right:
        cut |= boxes[:, 2] >= tile_width - tolerance
    if bottom:
        cut |= boxes[:, 3] >= tile_height - tolerance
    return cut


def core_margin(overlap: int) -> float:
    """How far in from an inner tile edge a box's centre must lie for its tile to report it.

    Half the overlap, less :data:`CORE_SLACK`: a neighbour sees every dropped box at least
    ``overlap / 2 + CORE_SLACK`` px from its own edges, with more of the scene around it, and
    the zones two neighbours keep overlap by ``2 * CORE_SLACK`` px, so an object whose box
    centre moves a little between the two tiles is still kept by one (and NMS merges the two
    when both keep it).
    """
    return max(overlap / 2 - CORE_SLACK, 0.0)


def in_tile_core(
    boxes: np.ndarray,
    tile_width: int,
    tile_height: int,
    inner: tuple[bool, bool, bool, bool],
    margin: float,
) -> np.ndarray:
    """Which boxes (tile pixels) have their centre at least ``margin`` from every inner edge.

    Near an inner edge the model sees only part of an object's surroundings and scores what
    it sees differently from the whole image; the neighbouring tile sees the same place
    further in. Edges on the raster's border are no reason to drop a box.
    """
    left, top, right, bottom = inner
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    keep = np.ones(len(boxes), dtype=bool)
    if left:
        keep &= cx >= margin
    if top:
        keep &= cy >= margin
    if right:
        keep &= cx <= tile_width - margin
    if bottom:
        keep &= cy <= tile_height - margin
    return keep


# --------------------------------------------------------------------------------------------
# Per scene: overlapping pairs, edge rule, greedy NMS
# --------------------------------------------------------------------------------------------


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)


def overlapping_pairs(
    boxes: np.ndarray, class_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every unordered pair of boxes whose intersection has positive area.

    Returns ``(a, b, intersection)`` with ``a < b``. With ``class_ids`` only same-class pairs.

    Each box is hashed into every grid cell it covers (cells about twice the median box
    side, so most boxes cover one to four); a pair is reported only by the cell that holds
    the upper-left corner of its intersection, hence exactly once. Classes get separate
    grids. Work is linear in the number of boxes times the local density.
    """
    empty = np.zeros(0, dtype=np.int64)
    count = len(boxes)
    if count < 2:
        return empty, empty, np.zeros(0, dtype=np.float64)
    boxes = boxes.astype(np.float64, copy=False)
    if class_ids is None:
        groups, group_count = np.zeros(count, dtype=np.int64), 1
    else:
        unique, groups = np.unique(class_ids, return_inverse=True)
        group_count = len(unique)
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cell = max(float(np.median(sides)) * 2.0, 1e-3)
    origin_x, origin_y = boxes[:, 0].min(), boxes[:, 1].min()
    cx0 = np.floor((boxes[:, 0] - origin_x) / cell).astype(np.int64)
    cy0 = np.floor((boxes[:, 1] - origin_y) / cell).astype(np.int64)
    cx1 = np.floor((boxes[:, 2] - origin_x) / cell).astype(np.int64)
    cy1 = np.floor((boxes[:, 3] - origin_y) / cell).astype(np.int64)
    rows = int(cy1.max()) + 1

    def cell_key(cx: np.ndarray, cy: np.ndarray, group: np.ndarray) -> np.ndarray:
        return (cx * rows + cy) * group_count + group

    # Work in spatial order: the gathers below then touch memory nearly in sequence.
    spatial = np.argsort(cell_key(cx0, cy0, groups), kind="stable")
    boxes, groups = boxes[spatial], groups[spatial]
    cx0, cy0, cx1, cy1 = cx0[spatial], cy0[spatial], cx1[spatial], cy1[spatial]

    # One entry per (box, covered cell).
    span_x, span_y = cx1 - cx0 + 1, cy1 - cy0 + 1
    per_box = span_x * span_y
    entry_box = np.repeat(np.arange(count), per_box)
    within = np.arange(per_box.sum()) - np.repeat(np.cumsum(per_box) - per_box, per_box)
    entry_cx = cx0[entry_box] + within // span_y[entry_box]
    entry_cy = cy0[entry_box] + within % span_y[entry_box]
    entry_cell = cell_key(entry_cx, entry_cy, groups[entry_box])
    order = np.argsort(entry_cell, kind="stable")
    entry_box, entry_cell = entry_box[order], entry_cell[order]

    # Pair each entry with the later entries of the same cell.
    group_end = np.searchsorted(entry_cell, entry_cell, side="right")
    partners = group_end - np.arange(len(entry_cell)) - 1
    first = np.repeat(np.arange(len(entry_cell)), partners)
    offset = np.arange(partners.sum()) - np.repeat(np.cumsum(partners) - partners, partners)
    second = first + 1 + offset
    a, b, pair_cell = entry_box[first], entry_box[second], entry_cell[first]

    ix0 = np.maximum(boxes[a, 0], boxes[b, 0])
    iy0 = np.maximum(boxes[a, 1], boxes[b, 1])
    ix1 = np.minimum(boxes[a, 2], boxes[b, 2])
    iy1 = np.minimum(boxes[a, 3], boxes[b, 3])
    intersection = np.maximum(ix1 - ix0, 0) * np.maximum(iy1 - iy0, 0)
    owner = cell_key(
        np.floor((ix0 - origin_x) / cell).astype(np.int64),
        np.floor((iy0 - origin_y) / cell).astype(np.int64),
        groups[a],
    )
    keep = (intersection > 0) & (owner == pair_cell)
    a, b, intersection = spatial[a[keep]], spatial[b[keep]], intersection[keep]
    swap = a > b
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    return a, b, intersection


def pair_overlap(
    boxes: np.ndarray, a: np.ndarray, b: np.ndarray, intersection: np.ndarray, metric: Metric
) -> np.ndarray:
    """IoU, or intersection over the smaller box (IoS), for each pair."""
    areas = _areas(boxes.astype(np.float64, copy=False))
    if metric == "iou":
        return intersection / (areas[a] + areas[b] - intersection)
    return intersection / np.maximum(np.minimum(areas[a], areas[b]), 1e-12)


def quantised_scores(scores: np.ndarray) -> np.ndarray:
    """Scores as whole steps of :data:`SCORE_STEP` (int64), what order decisions are made on.

    Two layouts (batch sizes, actors) round a score's last bits differently (6e-7 measured
    with the demo model); scores that differ by less than a step mostly share one, and then
    position, never the rounding, decides between them.
    """
    return np.floor(np.asarray(scores, dtype=np.float64) / SCORE_STEP).astype(np.int64)


def score_rank(scores: np.ndarray) -> np.ndarray:
    """Rank of each box in greedy order: highest quantised score first, ties by index (boxes
    arrive in plan order, each tile's in its own deterministic order)."""
    order = np.argsort(-quantised_scores(scores), kind="stable")
    rank = np.empty(len(scores), dtype=np.int64)
    rank[order] = np.arange(len(scores))
    return rank


def greedy_over_pairs(rank: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Greedy NMS given the pairs that suppress each other; returns a keep mask.

    A box is kept iff no kept box that outranks it is paired with it. Decided in rounds,
    vectorised: a box is suppressed once an outranking partner is kept, and kept once every
    outranking partner is suppressed. The best undecided box is always decided in the next
    round, so this ends, and every decision is the one the sequential loop would make.
    """
    count = len(rank)
    stronger = np.where(rank[a] < rank[b], a, b)
    weaker = np.where(rank[a] < rank[b], b, a)
    state = np.full(count, _KEPT, dtype=np.int8)
    state[weaker] = _UNDECIDED
    blocked = np.zeros(count, dtype=bool)
    while len(weaker):
        hit = state[stronger] == _KEPT
        state[weaker[hit]] = _SUPPRESSED
        live = state[weaker] == _UNDECIDED
        stronger, weaker = stronger[live], weaker[live]
        if not len(weaker):
            break
        waiting = weaker[state[stronger] != _SUPPRESSED]
        blocked[waiting] = True
        candidates = weaker[~blocked[weaker]]
        state[candidates] = _KEPT
        blocked[waiting] = False
    return state == _KEPT


def drop_cut_duplicates(
    boxes: np.ndarray,
    class_ids: np.ndarray,
    is_cut: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Keep mask: a cut box goes when a whole box of its class covers most of it.

    An object that a tile edge cuts is seen whole by the neighbouring tile whenever the
    overlap is at least the object's size; the cut half must not survive beside it. A cut
    box with no whole box over it (an object larger than the overlap) is kept.
    """
    keep = np.ones(len(boxes), dtype=bool)
    if not is_cut.any():
        return keep
    a, b, intersection = pairs if pairs is not None else overlapping_pairs(boxes, class_ids)
    areas = _areas(boxes.astype(np.float64, copy=False))
    for cut_side, whole_side in ((a, b), (b, a)):
        mixed = is_cut[cut_side] & ~is_cut[whole_side]
        covered = intersection[mixed] >= CUT_COVERED_FRACTION * areas[cut_side[mixed]]
        keep[cut_side[mixed][covered]] = False
    return keep


@dataclass(frozen=True)
class MergeOptions:
    """``metric``: IoU, or intersection over the smaller box (IoS, for nested boxes).
    ``mode``: 'suppress' keeps the best box of each group (NMS); 'merge' keeps the best
    box's score and class but widens it to the union of the boxes it suppressed."""

    iou_threshold: float = 0.5
    metric: Metric = "iou"
    class_aware: bool = True
    mode: Literal["suppress", "merge"] = "suppress"


def merge_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    is_cut: np.ndarray,
    options: MergeOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The edge rule, then greedy NMS, over one scene's boxes (scene pixels).

    Returns ``(kept, out_boxes)``: indices of the surviving boxes in greedy order (score
    descending, ties by index) and their output boxes, ``(len(kept), 4)``.
    """
    options = options or MergeOptions()
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4))
    boxes = boxes.astype(np.float64, copy=False)
    same_class = class_ids if options.class_aware else None
    pairs = overlapping_pairs(boxes, same_class)
    # The edge rule always compares within a class: a cut car is no duplicate of a whole ship.
    cut_pairs = pairs if options.class_aware else overlapping_pairs(boxes, class_ids)
    alive = drop_cut_duplicates(boxes, class_ids, is_cut, cut_pairs)

    a, b, intersection = pairs
    both_alive = alive[a] & alive[b]
    a, b, intersection = a[both_alive], b[both_alive], intersection[both_alive]
    suppressing = pair_overlap(boxes, a, b, intersection, options.metric) > options.iou_threshold
    a, b = a[suppressing], b[suppressing]
    rank = score_rank(scores)
    keep = greedy_over_pairs(rank, a, b) & alive
    kept = np.flatnonzero(keep)
    kept = kept[np.argsort(rank[kept], kind="stable")]
    if options.mode == "suppress":
        return kept, boxes[kept]
    return kept, _union_with_suppressed(boxes, rank, keep, a, b)[kept]


@dataclass(frozen=True)
class Candidates:
    """Boxes in scene pixels with their scores, class ids and 'cut by a tile edge' flags."""

    boxes: np.ndarray  # (n, 4) float64
    scores: np.ndarray  # (n,) float32
    class_ids: np.ndarray  # (n,) int16
    is_cut: np.ndarray  # (n,) bool

    @staticmethod
    def empty() -> Candidates:
        return Candidates(
            np.zeros((0, 4)), np.zeros(0, np.float32), np.zeros(0, np.int16), np.zeros(0, bool)
        )

    def __len__(self) -> int:
        return len(self.boxes)

    def select(self, index: np.ndarray) -> Candidates:
        return Candidates(
            self.boxes[index], self.scores[index], self.class_ids[index], self.is_cut[index]
        )

    @staticmethod
    def concat(parts: list[Candidates]) -> Candidates:
        parts = [part for part in parts if len(part)] or [Candidates.empty()]
        return Candidates(
            np.concatenate([p.boxes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.class_ids for p in parts]),
            np.concatenate([p.is_cut for p in parts]),
        )


def touching_groups(boxes: np.ndarray) -> np.ndarray:
    """Group id per box: connected components of 'intersects with positive area'.

    The edge rule and greedy NMS only ever compare intersecting boxes, so merging each group
    on its own gives the same result as merging all boxes at once.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b, _ = overlapping_pairs(boxes)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(boxes), len(boxes)))
    return connected_components(graph, directed=False)[1]


def _union_with_suppressed(
    boxes: np.ndarray, rank: np.ndarray, keep: np.ndarray, a: np.ndarray, b: np.ndarray
) -> np.ndarray:
    """Each kept box widened to cover the boxes it suppressed.

    A suppressed box belongs to the kept box that greedy NMS met first: its best-ranked kept
    partner.
    """
    stronger = np.where(rank[a] < rank[b], a, b)
    weaker = np.where(rank[a] < rank[b], b, a)
    matched = keep[stronger] & ~keep[weaker]
    stronger, weaker = stronger[matched], weaker[matched]
    order = np.lexsort((rank[stronger], weaker))
    stronger, weaker = stronger[order], weaker[order]
    _, first = np.unique(weaker, return_index=True)
    owner, member = stronger[first], weaker[first]
    out = boxes.copy()
    np.minimum.at(out[:, 0], owner, boxes[member, 0])
    np.minimum.at(out[:, 1], owner, boxes[member, 1])
    np.maximum.at(out[:, 2], owner, boxes[member, 2])
    np.maximum.at(out[:, 3], owner, boxes[member, 3])
    return out


def merge_boxes(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    is_cut: np.ndarray,
    options: MergeOptions | None = None,
) -> np.ndarray:
    """Indices of the boxes that survive the edge rule and greedy NMS, in greedy order."""
    return merge_detections(boxes, scores, class_ids, is_cut, options)[0]


# --------------------------------------------------------------------------------------------
# Scene pixels → CRS
# --------------------------------------------------------------------------------------------

Transform6 = tuple[float, float, float, float, float, float]


def box_rings(boxes: np.ndarray, transform: Transform6) -> np.ndarray:
    """Closed rings ``(n, 5, 2)`` of box corners mapped through the full affine.

    ``transform`` is ``(a, b, c, d, e, f)`` as in ``rasterio.Affine``: ``x = a*col + b*row + c``
    and ``y = d*col + e*row + f``; rotated and south-up rasters need no special case.
    """
    a, b, c, d, e, f = transform
    x0, y0, x1, y1 = (boxes[:, i].astype(np.float64) for i in range(4))
    cols = np.stack([x0, x1, x1, x0, x0], axis=1)
    rows = np.stack([y0, y0, y1, y1, y0], axis=1)
    return np.stack([a * cols + b * rows + c, d * cols + e * rows + f], axis=2)


def detection_ids(
    scene_id: str,
    model_id: str,
    settings_hash: str,
    boxes: np.ndarray,
    class_ids: np.ndarray,
) -> list[str]:
    """Ids stable across re-runs of the same scene, model and settings (16 hex digits)."""
    prefix = f"{scene_id}|{model_id}|{settings_hash}|".encode()
    rounded = np.round(boxes.astype(np.float64), 2)
    return [
        hashlib.blake2b(
            prefix + f"{int(cls)}|{x0:.2f}|{y0:.2f}|{x1:.2f}|{y1:.2f}".encode(), digest_size=8
        ).hexdigest()
        for cls, (x0, y0, x1, y1) in zip(class_ids, rounded, strict=True)
    ]
