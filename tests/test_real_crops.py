"""Real aerial crops (tests/data/neon: NEON imagery, DeepForest's hand-drawn tree boxes):
the tile plan, windowed reads, the merge, and tiled against whole-image inference with the
shipped demo model. Library functions only, no Ray."""

from __future__ import annotations

import csv
import importlib.util
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from pipeline.io.rasters import inspect_raster
from pipeline.io.reads import read_tiles
from pipeline.merge.scene import SceneContext, merge_in_memory
from pipeline.model.detector import TileDetections
from pipeline.ops.boxes import Candidates, MergeOptions, core_margin
from pipeline.ops.tiles import plan_offsets, plan_tiles, planned_overlap

DATA = Path(__file__).parent / "data" / "neon"
OSBS, SOAP = DATA / "OSBS_029.tif", DATA / "SOAP_061.png"
ROOT = Path(__file__).resolve().parents[1]
DEMO_STRIDE = 64  # the demo model's largest stride (test_detect checks the derivation)
# On a 400 px crop: 272/128 plans [0, 128], ending exactly at the crop's edge; 256/128 plans
# [0, 128, 192], the last tile padded 48 px past it.
DIVIDES, PADS = (272, 128), (256, 128)


def annotations(path: Path) -> np.ndarray:
    """The crop's hand-drawn boxes ``(n, 4)`` in pixels (DeepForest's CSV or Pascal VOC)."""
    if path.suffix == ".csv":
        rows = list(csv.DictReader(path.open()))
        return np.array([[float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax")] for r in rows])
    boxes = ET.parse(path).getroot().iter("bndbox")
    return np.array(
        [[float(b.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")] for b in boxes]
    )


def bench_module():
    """bench/tiled_vs_whole.py: the test and the benchmark share one definition of 'matched'."""
    spec = importlib.util.spec_from_file_location(
        "tiled_vs_whole", ROOT / "bench/tiled_vs_whole.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("tiled_vs_whole", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", [OSBS, SOAP], ids=["OSBS_029", "SOAP_061"])
@pytest.mark.parametrize(("tile", "overlap"), [DIVIDES, PADS], ids=["ends-at-edge", "padded"])
def test_plan_of_a_real_crop(path, tile, overlap):
    info = inspect_raster(path.stem, str(path), None, None, allow_pixel_coordinates=True)
    assert (info.width, info.height) == (400, 400)
    cols, rows = plan_offsets(info.width, info.height, tile, overlap, DEMO_STRIDE)
    assert (cols % DEMO_STRIDE == 0).all() and (rows % DEMO_STRIDE == 0).all()
    ends = sorted(set((cols + tile).tolist()))
    assert ends[-1] == (400 if (tile, overlap) == DIVIDES else 448)
    cores = np.zeros((400, 400), np.int32)
    for t in plan_tiles(info.width, info.height, tile, overlap, DEMO_STRIDE):
        cores[
            t.core_row_off : t.core_row_off + t.core_height,
            t.core_col_off : t.core_col_off + t.core_width,
        ] += 1
    assert (cores == 1).all()


def test_reads_of_a_real_crop_match_rasterio_and_mask_its_nodata_and_the_padding():
    """OSBS_029.tif declares nodata 255: pixels saturated in any band are invalid (2,126)."""
    tile = PADS[0]
    cols, rows = plan_offsets(400, 400, *PADS, DEMO_STRIDE)
    windows = [Window(int(c), int(r), tile, tile) for c, r in zip(cols, rows, strict=True)]
    images, valid = read_tiles(str(OSBS), windows, [1, 2, 3], (0.0, 255.0), None, tile, 60)
    with rasterio.open(OSBS) as dataset:
        pixels = dataset.read()
        mask = dataset.read_masks().min(axis=0) > 0
    assert (~mask).sum() == 2126
    for (c, r), image, ok in zip(zip(cols, rows, strict=True), images, valid, strict=True):
        h, w = min(tile, 400 - r), min(tile, 400 - c)
        expected_ok = mask[r : r + h, c : c + w]
        assert (ok[:h, :w].astype(bool) == expected_ok).all()
        assert not ok[h:].any() and not ok[:, w:].any()  # past the crop's edge
        inside = pixels[:, r : r + h, c : c + w]
        assert (image[:, :h, :w][:, expected_ok] == inside[:, expected_ok]).all()
        assert not image[:, :h, :w][:, ~expected_ok].any()


def merged(
    path: Path, tile: int, overlap: int, found: list[TileDetections], cols, rows
) -> Candidates:
    """The job's merge (core rule, edge rule, band-by-band NMS) over one crop's tiles."""
    info = inspect_raster(path.stem, str(path), None, None, allow_pixel_coordinates=True)
    context = SceneContext(
        scene_id=path.stem, scene_uri=str(path), info=info, tile_size=tile, edge_tolerance=2.0,
        merge=MergeOptions(), class_names=("Tree",), model_id="", settings_hash="", run_id="",
        output_crs="OGC:CRS84", output_uri="", row_group_size=10_000,
        core_margin=core_margin(planned_overlap(tile, overlap, DEMO_STRIDE)),
    )  # fmt: skip
    return merge_in_memory(context, cols, rows, found)


@pytest.mark.parametrize(
    ("image", "labels"), [(OSBS, "OSBS_029.csv"), (SOAP, "SOAP_061.xml")], ids=["OSBS", "SOAP"]
)
@pytest.mark.parametrize(("tile", "overlap"), [DIVIDES, PADS], ids=["ends-at-edge", "padded"])
def test_merge_reports_each_hand_drawn_tree_once_with_its_box(image, labels, tile, overlap):
    """Each tile 'detects' the hand-drawn boxes as it sees them (cut by its edges): after the
    merge every tree comes back once, whole, at its place, however the plan cut it."""
    truth = annotations(DATA / labels)
    cols, rows = plan_offsets(400, 400, tile, overlap, DEMO_STRIDE)
    scores = np.linspace(0.9, 0.5, len(truth)).astype(np.float32)
    found = []
    for c, r in zip(cols, rows, strict=True):
        local = truth - [c, r, c, r]
        clipped = np.clip(local, 0, tile)
        seen = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        found.append(
            TileDetections(
                clipped[seen].astype(np.float32), scores[seen], np.zeros(seen.sum(), np.int16)
            )
        )
    result = merged(image, tile, overlap, found, cols, rows)
    assert len(result) == len(truth)
    # Bands come out top to bottom: compare as sets of (box, score) rows.
    got = np.column_stack([result.boxes, result.scores])
    want = np.column_stack([truth, scores])
    np.testing.assert_array_equal(np.unique(got, axis=0), np.unique(want, axis=0))


@pytest.fixture(scope="module")
def comparison():
    bench = bench_module()
    settings = bench.demo_settings()
    reference = settings.model_copy(
        update={"topk_candidates": bench.NO_CAP, "detections_per_tile": bench.NO_CAP}
    )
    return (
        bench,
        settings,
        {path: bench.detect_crop(path, reference, 448, 0) for path in (OSBS, SOAP)},
    )


@pytest.mark.parametrize(("tile", "overlap"), [DIVIDES, PADS], ids=["ends-at-edge", "padded"])
def test_tiled_inference_equals_whole_image_inference_on_real_crops(comparison, tile, overlap):
    """The demo model, tiled as a job tiles, against one tile over the whole crop with no cap
    on candidates (bench/tiled_vs_whole.py prints the same figures over more tilings)."""
    bench, settings, wholes = comparison
    totals = dict.fromkeys(("whole", "matched", "tiled", "extra", "duplicates"), 0)
    for path, whole in wholes.items():
        for key, value in bench.compare(
            bench.detect_crop(path, settings, tile, overlap), whole
        ).items():
            totals[key] += value
    assert totals["whole"] >= 40  # enough trees for the fractions to mean something
    assert totals["matched"] / totals["whole"] >= 0.99
    assert totals["extra"] / totals["tiled"] <= 0.02
    assert totals["duplicates"] == 0
