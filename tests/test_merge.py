import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import Affine
from torchvision.ops import batched_nms

from pipeline.merge.bands import BandMerger
from pipeline.ops.boxes import (
    CORE_SLACK,
    CUT_COVERED_FRACTION,
    SCORE_STEP,
    Candidates,
    MergeOptions,
    box_rings,
    core_margin,
    detection_ids,
    in_tile_core,
    merge_boxes,
    merge_detections,
    overlapping_pairs,
    touches_inner_edge,
    valid_fraction,
)


def reference_merge(boxes, scores, class_ids, is_cut, options=None, return_union=False):
    """The definition, quadratic and obvious: edge rule, then class-aware greedy NMS."""
    options = options or MergeOptions()
    count = len(boxes)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def intersection(i, j):
        w = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
        h = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
        return max(w, 0) * max(h, 0)

    alive = np.ones(count, dtype=bool)
    for i in range(count):
        if not is_cut[i]:
            continue
        for j in range(count):
            if is_cut[j] or class_ids[j] != class_ids[i]:
                continue
            inter = intersection(i, j)
            if inter > 0 and inter >= CUT_COVERED_FRACTION * areas[i]:
                alive[i] = False
    # Greedy order: quantised score first (decisions never hang on a score's last bits).
    steps = np.floor(np.asarray(scores, np.float64) / SCORE_STEP)
    order = sorted(range(count), key=lambda i: (-steps[i], i))
    kept = []
    union = boxes.astype(np.float64).copy()
    for i in order:
        if not alive[i]:
            continue
        suppressed = False
        for j in kept:
            if options.class_aware and class_ids[j] != class_ids[i]:
                continue
            inter = intersection(i, j)
            if inter <= 0:
                continue
            if options.metric == "iou":
                overlap = inter / (areas[i] + areas[j] - inter)
            else:
                overlap = inter / min(areas[i], areas[j])
            if overlap > options.iou_threshold:
                suppressed = True
                union[j, :2] = np.minimum(union[j, :2], boxes[i, :2])
                union[j, 2:] = np.maximum(union[j, 2:], boxes[i, 2:])
                break
        if not suppressed:
            kept.append(i)
    kept = np.array(kept, dtype=np.int64)
    if return_union:
        return kept, union[kept]
    return kept


@st.composite
def scenes_of_boxes(draw, max_boxes=60):
    count = draw(st.integers(0, max_boxes))
    extent = draw(st.sampled_from([60.0, 200.0, 1000.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x0 = rng.uniform(0, extent, count)
    y0 = rng.uniform(0, extent, count)
    # Clustered duplicates: jitter copies of a few boxes, as overlapping tiles produce.
    w = rng.uniform(1, 50, count)
    h = rng.uniform(1, 50, count)
    copies = rng.integers(0, max(count, 1), count // 3)
    if count:
        x0[: len(copies)] = x0[copies] + rng.normal(0, 2, len(copies))
        y0[: len(copies)] = y0[copies] + rng.normal(0, 2, len(copies))
    boxes = np.stack([x0, y0, x0 + w, y0 + h], axis=1)
    scores = rng.permutation(count).astype(np.float32) / max(count, 1)  # distinct
    if draw(st.booleans()):
        scores = np.round(scores, 1)  # ties
    class_ids = rng.integers(0, draw(st.integers(1, 3)), count).astype(np.int16)
    is_cut = rng.random(count) < draw(st.sampled_from([0.0, 0.3]))
    return boxes, scores, class_ids, is_cut


@settings(max_examples=300, deadline=None)
@given(
    scene=scenes_of_boxes(),
    threshold=st.sampled_from([0.1, 0.3, 0.5, 0.7]),
    metric=st.sampled_from(["iou", "ios"]),
    class_aware=st.booleans(),
)
def test_merge_equals_the_quadratic_reference(scene, threshold, metric, class_aware):
    boxes, scores, class_ids, is_cut = scene
    options = MergeOptions(iou_threshold=threshold, metric=metric, class_aware=class_aware)
    expected = reference_merge(boxes, scores, class_ids, is_cut, options)
    assert merge_boxes(boxes, scores, class_ids, is_cut, options).tolist() == expected.tolist()


@settings(max_examples=150, deadline=None)
@given(scene=scenes_of_boxes(), metric=st.sampled_from(["iou", "ios"]))
def test_merge_mode_grows_each_kept_box_to_its_group(scene, metric):
    boxes, scores, class_ids, is_cut = scene
    options = MergeOptions(iou_threshold=0.3, metric=metric, mode="merge")
    expected_kept, expected_boxes = reference_merge(
        boxes, scores, class_ids, is_cut, options, return_union=True
    )
    kept, out = merge_detections(boxes, scores, class_ids, is_cut, options)
    assert kept.tolist() == expected_kept.tolist()
    np.testing.assert_allclose(out, expected_boxes)


def test_merge_mode_union_of_two_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [2, 1, 12, 11]], dtype=np.float64)
    kept, out = merge_detections(
        boxes,
        np.array([0.9, 0.8], np.float32),
        np.zeros(2, np.int16),
        np.zeros(2, bool),
        MergeOptions(iou_threshold=0.3, mode="merge"),
    )
    assert kept.tolist() == [0] and out.tolist() == [[0, 0, 12, 11]]


def test_class_agnostic_suppresses_across_classes():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], dtype=np.float64)
    args = (boxes, np.array([0.9, 0.8], np.float32), np.array([0, 1], np.int16), np.zeros(2, bool))
    assert merge_boxes(*args).tolist() == [0, 1]
    assert merge_boxes(*args, MergeOptions(class_aware=False)).tolist() == [0]


@settings(max_examples=100, deadline=None)
@given(scene=scenes_of_boxes(max_boxes=200))
def test_merge_equals_torchvision_batched_nms_without_cut_boxes(scene):
    boxes, scores, class_ids, _ = scene
    boxes = boxes.astype(np.float32).astype(np.float64)  # both sides see the same numbers
    scores = np.arange(len(scores), dtype=np.float32)[np.argsort(scores)]  # distinct
    no_cut = np.zeros(len(boxes), dtype=bool)
    ours = merge_boxes(boxes, scores, class_ids, no_cut, MergeOptions(iou_threshold=0.5))
    theirs = batched_nms(
        torch.from_numpy(boxes).float(), torch.from_numpy(scores), torch.from_numpy(class_ids), 0.5
    ).numpy()
    assert ours.tolist() == theirs.tolist()


def test_long_suppression_chain_is_exact():
    # Each box overlaps the next (IoU ~0.6) with falling score: greedy keeps every other one.
    count = 301
    x0 = np.arange(count) * 4.0
    boxes = np.stack([x0, np.zeros(count), x0 + 16, np.full(count, 10.0)], axis=1)
    scores = np.linspace(1, 0.1, count).astype(np.float32)
    kept = merge_boxes(boxes, scores, np.zeros(count, np.int16), np.zeros(count, bool))
    expected = reference_merge(boxes, scores, np.zeros(count, np.int16), np.zeros(count, bool))
    assert kept.tolist() == expected.tolist()


def test_pairs_are_found_once_across_grid_cells_including_a_huge_box():
    boxes = np.array(
        [[0, 0, 10, 10], [5, 5, 15, 15], [100, 100, 110, 110], [0, 0, 1000, 1000], [9, 9, 30, 30]],
        dtype=np.float64,
    )
    a, b, inter = overlapping_pairs(boxes)
    pairs = sorted(zip(a.tolist(), b.tolist(), strict=False))
    assert pairs == [(0, 1), (0, 3), (0, 4), (1, 3), (1, 4), (2, 3), (3, 4)]
    assert inter[pairs.index((0, 1))] == 25


def test_cut_half_does_not_survive_beside_the_whole_box():
    whole = [100, 10, 130, 40]
    half = [112, 10, 130, 40]  # the same object seen by the next tile, cut at x=112
    boxes = np.array([half, whole], dtype=np.float64)
    kept = merge_boxes(
        boxes, np.array([0.99, 0.5], np.float32), np.zeros(2, np.int16), np.array([True, False])
    )
    assert kept.tolist() == [1]


def test_cut_box_without_whole_box_is_kept():
    boxes = np.array([[0, 0, 100, 30]], dtype=np.float64)
    assert merge_boxes(
        boxes, np.ones(1, np.float32), np.zeros(1, np.int16), np.array([True])
    ).tolist() == [0]


def test_touches_inner_edge_only_for_inner_sides():
    boxes = np.array([[0, 10, 20, 20], [50, 50, 100, 60], [30, 0, 40, 10]], dtype=np.float32)
    cut = touches_inner_edge(boxes, 100, 100, (True, False, False, False), 1.0)
    assert cut.tolist() == [True, False, False]
    cut = touches_inner_edge(boxes, 100, 100, (False, True, True, False), 1.0)
    assert cut.tolist() == [False, True, True]


def test_a_tile_reports_only_boxes_centred_away_from_its_inner_edges():
    # Centres at x = 10, 50, 95 in a 100 px tile whose right edge is inner, margin 28.
    boxes = np.array([[0, 40, 20, 60], [40, 40, 60, 60], [90, 40, 100, 60]], dtype=np.float32)
    assert in_tile_core(boxes, 100, 100, (False, False, True, False), 28.0).tolist() == [
        True,
        True,
        False,
    ]
    assert in_tile_core(boxes, 100, 100, (True, False, True, False), 28.0).tolist() == [
        False,
        True,
        False,
    ]
    assert in_tile_core(boxes, 100, 100, (False,) * 4, 28.0).all()  # the raster's border


@given(
    size=st.integers(300, 3000),
    tile=st.sampled_from([256, 512]),
    overlap=st.sampled_from([32, 64, 128]),
    align=st.sampled_from([1, 64]),
    centre=st.floats(0, 1),
)
def test_every_box_centre_is_reported_by_some_tile_of_the_plan(size, tile, overlap, align, centre):
    """The zones that tiles report (inside their cores' margin) cover the raster, with
    CORE_SLACK to spare, so no object is dropped by every tile that sees it."""
    from pipeline.ops.tiles import aligned_step, axis_offsets, inner_edges

    x = 5 + centre * (size - 10)  # boxes inside the raster, however they move
    offsets = axis_offsets(size, tile, overlap, align)
    margin = core_margin(tile - aligned_step(tile, overlap, align))
    for shift in (-0.9 * CORE_SLACK, 0.0, 0.9 * CORE_SLACK):  # the box moves a little
        box = np.array([[x - 1 + shift, 0, x + 1 + shift, 2]], dtype=np.float64)
        reported = [
            in_tile_core(
                box - [o, 0, o, 0], tile, tile, inner_edges(o, 0, tile, size, tile), margin
            )
            for o in offsets
            if o <= x + shift - 1 and x + shift + 1 <= o + tile
        ]
        assert any(bool(keep[0]) for keep in reported)


def test_valid_fraction():
    valid = np.zeros((10, 10), np.uint8)
    valid[:, :5] = 1
    boxes = np.array([[0, 0, 4, 4], [3, 0, 7, 10], [6, 6, 9, 9]], dtype=np.float32)
    assert valid_fraction(boxes, valid).tolist() == [1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    "transform",
    [
        Affine(0.5, 0, 500000, 0, -0.5, 4650000),  # north-up
        Affine(0.5, 0, 500000, 0, 0.5, 4640000),  # south-up
        Affine.translation(500000, 4650000) @ Affine.rotation(30) @ Affine.scale(0.5, -0.5),
    ],
)
def test_box_rings_follow_the_full_affine(transform):
    box = np.array([[10, 20, 30, 60]], dtype=np.float64)
    ring = box_rings(box, tuple(transform)[:6])[0]
    corners = [(10, 20), (30, 20), (30, 60), (10, 60), (10, 20)]
    for (x, y), (col, row) in zip(ring, corners, strict=False):
        ex, ey = transform @ (col, row)
        assert x == pytest.approx(ex, abs=1e-6) and y == pytest.approx(ey, abs=1e-6)


def test_upper_left_convention_has_no_half_pixel_shift():
    transform = Affine(2.0, 0, 1000, 0, -2.0, 5000)
    ring = box_rings(np.array([[0, 0, 1, 1]], dtype=np.float64), tuple(transform)[:6])[0]
    assert ring[0].tolist() == [1000, 5000]  # the raster's own corner
    assert ring[2].tolist() == [1002, 4998]


def test_detection_ids_are_stable_and_distinct():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 11]], dtype=np.float32)
    classes = np.zeros(2, np.int16)
    first = detection_ids("s", "m", "h", boxes, classes)
    assert first == detection_ids("s", "m", "h", boxes, classes)
    assert len(set(first)) == 2
    assert first != detection_ids("s", "m2", "h", boxes, classes)


@settings(max_examples=200, deadline=None)
@given(
    scene=scenes_of_boxes(max_boxes=120),
    bands=st.integers(1, 6),
    threshold=st.sampled_from([0.3, 0.5]),
    metric=st.sampled_from(["iou", "ios"]),
    class_aware=st.booleans(),
    mode=st.sampled_from(["suppress", "merge"]),
)
def test_band_by_band_merge_equals_merging_all_at_once(
    scene, bands, threshold, metric, class_aware, mode
):
    """Boxes arrive in horizontal bands (tile rows): every box starts at or below its band's
    top, as a tile's boxes do. Band by band, holding only open groups, must give the same
    boxes as one merge over all of them."""
    boxes, scores, class_ids, is_cut = scene
    options = MergeOptions(threshold, metric, class_aware, mode)
    extent = max(float(boxes[:, 3].max()), 1.0) if len(boxes) else 1.0
    tops = np.linspace(0, extent, bands, endpoint=False)
    band_of = np.clip(np.searchsorted(tops, boxes[:, 1], side="right") - 1, 0, None)
    order = np.argsort(band_of, kind="stable")  # the order a scene's tiles are gathered in
    everything = Candidates(boxes[order], scores[order], class_ids[order], is_cut[order])
    band_of = band_of[order]

    kept, out = merge_detections(*vars(everything).values(), options)
    expected = sorted(zip(out.round(9).tolist(), everything.scores[kept].tolist(), strict=True))

    merger = BandMerger(options)
    found = []
    for band in range(bands):
        next_top = float(tops[band + 1]) if band + 1 < bands else None
        final = merger.add(everything.select(np.flatnonzero(band_of == band)), next_top)
        found += zip(final.boxes.round(9).tolist(), final.scores.tolist(), strict=True)
    assert len(merger.pending) == 0
    assert sorted(found) == expected


def test_band_merger_holds_only_open_groups():
    merger = BandMerger()
    whole = Candidates(
        np.array([[0, 0, 10, 10], [0, 90, 10, 110.0]]),
        np.array([0.9, 0.8], np.float32),
        np.zeros(2, np.int16),
        np.zeros(2, bool),
    )
    final = merger.add(whole, next_top=100.0)
    # The first box ends above the next band: final now. The second crosses into it: held.
    assert final.boxes.tolist() == [[0, 0, 10, 10]]
    assert merger.pending.boxes.tolist() == [[0, 90, 10, 110]]


@pytest.mark.parametrize("bump", [0.0, 1e-7], ids=["first-higher-by-rounding", "second-higher"])
def test_a_near_tie_is_decided_by_position_not_by_the_last_bits(bump):
    """Two layouts round the same score's last bits differently (6e-7 measured): the merge
    keeps the same box, and writes rows in the same order, either way."""
    boxes = np.array([[10, 10, 40, 40], [12, 10, 42, 40], [200, 200, 230, 230]], np.float64)
    base = np.float32(0.7)
    scores = np.array([base + np.float32(1e-7 - bump), base + np.float32(bump), base], np.float32)
    assert scores[0] != scores[1]  # a real difference in the last bits
    kept = merge_boxes(boxes, scores, np.zeros(3, np.int16), np.zeros(3, bool))
    assert kept.tolist() == [0, 2]  # the first in plan order wins, the far box follows it


@pytest.mark.parametrize("bump", [0.0, 1e-7])
def test_tile_nms_order_decides_near_ties_by_place(bump):
    from pipeline.model.postprocess import decision_rank

    scores = torch.tensor([0.7 + 1e-7 - bump, 0.7 + bump, 0.9, 0.1], dtype=torch.float32)
    places = torch.tensor([5, 9, 30, 2])
    order = torch.argsort(decision_rank(scores, places), descending=True).tolist()
    assert order == [2, 0, 1, 3]
