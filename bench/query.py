"""Query pushdown: a 1 % bbox query over 10M detections in 1,000 scene files.

The dataset is written by the project's own writer (``pipeline.io.geoparquet``): Hilbert-ordered
rows, zstd, the default ``output.row_group_size``, GeoParquet 1.1 with the ``bbox`` covering.
1,000 scenes of 10k detections on average (log-normal, some dense, some sparse) on a jittered
grid over 10 x 6 degrees, neighbours overlapping by 10 %; 70 % of the boxes scattered, 30 % in
clusters ("harbours"). It is cached under bench/.cache (delete it to regenerate).

Bytes are *measured*: the query runs once through a filesystem that counts every byte handed
to the Parquet reader (``pipeline.io.iostats``, footers included; what `georetina query --stats`
prints), and again on the plain local filesystem while the process's read syscalls are counted
(/proc/self/io rchar) as a cross-check. Times are
taken on the plain filesystem with a warm page cache (the dataset was just written or read).

Prints one `name: value` line per figure:

    dataset_files, dataset_rows, dataset_bytes, row_groups_per_file,
    rows_returned, row_fraction,
    bytes_read_fraction        bytes read by the query over the dataset's size (counted)
    bytes_read_fraction_rchar  the same from the process's read syscalls
    query_1pct_s               `pipeline.io.query.query` wall time, median of 3 runs
    query_1pct_first_s         the first of those runs
    count_1pct_s               `--count` (counts per scene and class) for the same filter
    duckdb_1pct_s              DuckDB over the same files and filter, for comparison

Run: .venv/bin/python bench/query.py [--files 1000] [--rows 10000000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from pyproj import CRS

from pipeline.config import OutputSettings
from pipeline.io.geoparquet import SceneRows, detections_table, write_parquet_atomic
from pipeline.io.query import QueryFilter, count_detections, open_detections, query_detections

CACHE = Path(__file__).parent / ".cache"
WEST, SOUTH, EAST, NORTH = 10.0, 40.0, 20.0, 46.0
CLASSES = ("ship", "plane", "vehicle")
DEGREES_PER_PIXEL = 5e-6  # about 0.5 m


def scene_counts(files: int, rows: int, seed: int = 0) -> np.ndarray:
    """Detections per scene: log-normal weights, summing to exactly ``rows``."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 0.6, files)
    counts = np.floor(weights / weights.sum() * rows).astype(np.int64)
    counts[: rows - counts.sum()] += 1
    return counts


def scene_extent(index: int, files: int) -> tuple[float, float, float, float]:
    # About square cells: 40 x 25 for 1,000 scenes over 10 x 6 degrees.
    cols = max(1, round((files * (EAST - WEST) / (NORTH - SOUTH)) ** 0.5))
    rows = -(-files // cols)
    cell_w, cell_h = (EAST - WEST) / cols, (NORTH - SOUTH) / rows
    col, row = index % cols, index // cols
    x0, y0 = WEST + col * cell_w, SOUTH + row * cell_h
    pad_w, pad_h = cell_w * 0.05, cell_h * 0.05  # neighbours overlap by 10 %
    return (x0 - pad_w, y0 - pad_h, x0 + cell_w + pad_w, y0 + cell_h + pad_h)


def scene_rows(index: int, files: int, count: int, seed: int = 0) -> SceneRows:
    rng = np.random.default_rng((seed, index))
    west, south, east, north = scene_extent(index, files)
    scattered = int(count * 0.7)
    cx = rng.uniform(west, east, count)
    cy = rng.uniform(south, north, count)
    clusters = rng.uniform([west, south], [east, north], (3, 2))
    which = rng.integers(0, 3, count - scattered)
    cx[scattered:] = np.clip(clusters[which, 0] + rng.normal(0, 0.004, len(which)), west, east)
    cy[scattered:] = np.clip(clusters[which, 1] + rng.normal(0, 0.004, len(which)), south, north)
    half = rng.uniform(0.0001, 0.0004, (count, 2))
    x0, x1 = cx - half[:, 0], cx + half[:, 0]
    y0, y1 = cy - half[:, 1], cy + half[:, 1]
    rings = np.stack(
        [np.stack(c, axis=1) for c in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))], axis=1
    )
    pixel = np.stack(
        [
            (x0 - west) / DEGREES_PER_PIXEL,
            (north - y1) / DEGREES_PER_PIXEL,
            (x1 - west) / DEGREES_PER_PIXEL,
            (north - y0) / DEGREES_PER_PIXEL,
        ],
        axis=1,
    )
    class_ids = rng.choice(3, count, p=[0.5, 0.2, 0.3]).astype(np.int16)
    ids = rng.integers(0, 2**63, count, dtype=np.int64)
    scene_id = f"scene_{index:04d}-{index * 2654435761 % 2**32:08x}"
    return SceneRows(
        scene_id=scene_id,
        scene_uri=f"s3://archive/scenes/{scene_id}.tif",
        scene_crs="EPSG:32633",
        acquired_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=int(rng.integers(0, 8760))),
        model_id="ships:resnet50_fpn:0123456789ab",
        run_id="bench",
        detection_ids=[f"{i:016x}" for i in ids],
        class_ids=class_ids,
        class_names=[CLASSES[c] for c in class_ids],
        scores=rng.uniform(0.05, 1.0, count).astype(np.float32),
        pixel_boxes=pixel,
        rings=rings,
    )


def _write_one(job: tuple[int, int, int, str, int]) -> None:
    index, files, count, folder, row_group_size = job
    rows = scene_rows(index, files, count)
    table = detections_table(rows, CRS.from_user_input("OGC:CRS84").to_json_dict())
    write_parquet_atomic(table, f"{folder}/{rows.scene_id}.parquet", row_group_size)


def ensure_dataset(files: int, rows: int) -> Path:
    """Write the synthetic dataset once (two processes); reuse it while it is complete."""
    root = CACHE / f"query-{files}-{rows}"
    folder = root / "detections"
    marker = root / "complete"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    folder.mkdir(parents=True)
    row_group_size = OutputSettings.model_fields["row_group_size"].default
    counts = scene_counts(files, rows)
    jobs = [(i, files, int(counts[i]), str(folder), row_group_size) for i in range(files)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=2) as pool:
        list(pool.map(_write_one, jobs, chunksize=8))
    marker.write_text("ok")
    print(f"generated_s: {time.perf_counter() - started:.1f}")
    return root


def rchar() -> int:
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def one_percent_box(seed: int = 1) -> tuple[float, float, float, float]:
    """A box of a tenth of the extent on each side (1 % of the area), placed at random."""
    rng = np.random.default_rng(seed)
    width, height = (EAST - WEST) / 10, (NORTH - SOUTH) / 10
    x0 = rng.uniform(WEST, EAST - width)
    y0 = rng.uniform(SOUTH, NORTH - height)
    return (x0, y0, x0 + width, y0 + height)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    root = ensure_dataset(args.files, args.rows)
    files = sorted((root / "detections").glob("*.parquet"))
    total_bytes = sum(f.stat().st_size for f in files)
    import pyarrow.parquet as pq

    first = pq.ParquetFile(files[0]).metadata
    print(f"dataset_files: {len(files)}")
    print(f"dataset_rows: {args.rows}")
    print(f"dataset_bytes: {total_bytes}")
    print(f"row_groups_per_file: {first.num_row_groups} (first file, {first.num_rows} rows)")

    where = QueryFilter(bbox=one_percent_box())
    counted = open_detections(str(root), count_reads=True)
    result = query_detections(counted, where)
    reads = counted.reads
    print(f"query_bbox: {','.join(f'{v:.4f}' for v in where.bbox)}")
    print(f"rows_returned: {result.num_rows}")
    print(f"row_fraction: {result.num_rows / args.rows:.4f}")
    print(f"files_opened: {reads.opened} ({reads.requests} read requests)")
    print(f"bytes_read: {reads.bytes}")
    print(f"bytes_read_fraction: {reads.bytes / total_bytes:.4f}")

    times = []
    for _ in range(3):
        before = rchar()
        started = time.perf_counter()
        plain = query_detections(str(root), where)
        times.append(time.perf_counter() - started)
        read = rchar() - before
        assert plain.num_rows == result.num_rows
    print(f"bytes_read_fraction_rchar: {read / total_bytes:.4f}")
    print(f"query_1pct_first_s: {times[0]:.3f}")
    print(f"query_1pct_s: {statistics.median(times):.3f}")

    started = time.perf_counter()
    counts = count_detections(str(root), where)
    print(f"count_1pct_s: {time.perf_counter() - started:.3f} ({counts.num_rows} groups)")

    import duckdb

    x0, y0, x1, y1 = where.bbox
    started = time.perf_counter()
    duck = duckdb.sql(
        f"select * from read_parquet('{root}/detections/*.parquet') "
        f"where bbox.xmin <= {x1} and bbox.xmax >= {x0} "
        f"and bbox.ymin <= {y1} and bbox.ymax >= {y0}"
    ).to_arrow_table()
    print(f"duckdb_1pct_s: {time.perf_counter() - started:.3f} ({duck.num_rows} rows)")
    assert duck.num_rows == result.num_rows
    print(f"cpu_count: {os.cpu_count()}")


if __name__ == "__main__":
    main()
