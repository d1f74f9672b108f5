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

The archive case (``--case archive``): 20,000 small scene files (50 detections on average,
one row group each, written with pyarrow directly), recorded in a compacted scene table as a
nightly job leaves them, and the same 1 % bbox query with the index and without it:

    archive_files, archive_rows, archive_bytes, archive_index_bytes
    archive_files_opened       scene files the index lets through
    archive_bytes_read         bytes read by the query, the index included (counted)
    archive_bytes_read_fraction   archive_bytes_read over the dataset's bytes (index included)
    archive_matching_row_group_bytes  the bytes of the row groups whose bbox statistics match
    archive_bytes_read_over_target    archive_bytes_read over (2 x matching row groups + index)
    archive_query_1pct_s       the query through the index, median of 3 runs
    archive_query_1pct_noindex_s  the same query listing and opening every file, median of 3
    archive_index_speedup      the second over the first

Run: .venv/bin/python bench/query.py [--case all|pushdown|archive] [--files 1000]
     [--rows 10000000] [--archive-files 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import shapely
from pyproj import CRS

from pipeline.config import OutputSettings
from pipeline.io.geoparquet import (
    BBOX_TYPE,
    SCHEMA,
    SceneRows,
    detections_table,
    geo_metadata,
    write_parquet_atomic,
)
from pipeline.io.index import SCHEMA as INDEX_SCHEMA
from pipeline.io.query import (
    Detections,
    QueryFilter,
    candidates,
    count_detections,
    may_match,
    open_detections,
    query_detections,
    row_group_stats,
)

CACHE = Path(__file__).parent / ".cache"
WEST, SOUTH, EAST, NORTH = 10.0, 40.0, 20.0, 46.0
CLASSES = ("ship", "plane", "vehicle")
CORNERS = ("xmin", "ymin", "xmax", "ymax")
BBOX = BBOX_TYPE
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
    parser.add_argument("--case", choices=["all", "pushdown", "archive"], default="all")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--archive-files", type=int, default=20_000)
    args = parser.parse_args()
    if args.case in ("all", "pushdown"):
        pushdown(args)
    if args.case in ("all", "archive"):
        archive(args.archive_files)
    print(f"cpu_count: {os.cpu_count()}")


def pushdown(args: argparse.Namespace) -> None:
    root = ensure_dataset(args.files, args.rows)
    files = sorted((root / "detections").glob("*.parquet"))
    total_bytes = sum(f.stat().st_size for f in files)
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


# --------------------------------------------------------------------------------------------
# The archive case: many small scene files and the scene table's index
# --------------------------------------------------------------------------------------------

ARCHIVE_ROWS_PER_FILE = 50


def archive_table(files: int, seed: int = 2) -> tuple[pa.Table, np.ndarray]:
    """Every scene's rows in one table (scene after scene) and the row count of each."""
    rng = np.random.default_rng(seed)
    counts = scene_counts(files, files * ARCHIVE_ROWS_PER_FILE, seed)
    scene = np.repeat(np.arange(files), counts)
    extents = np.array([scene_extent(i, files) for i in range(files)])[scene]
    cx = rng.uniform(extents[:, 0], extents[:, 2])
    cy = rng.uniform(extents[:, 1], extents[:, 3])
    half = rng.uniform(0.0001, 0.0004, (len(scene), 2))
    bounds = np.stack([cx - half[:, 0], cy - half[:, 1], cx + half[:, 0], cy + half[:, 1]], 1)
    class_ids = rng.choice(3, len(scene), p=[0.5, 0.2, 0.3]).astype(np.int16)
    names = [f"scene_{i:05d}" for i in range(files)]
    times = datetime(2026, 1, 1, tzinfo=UTC) + rng.integers(0, 8760, files) * timedelta(hours=1)
    box = pa.StructArray.from_arrays([pa.array(bounds[:, i]) for i in range(4)], fields=list(BBOX))
    pixels = (bounds - bounds.min(axis=0)) / DEGREES_PER_PIXEL
    columns = {
        "scene_id": pa.array(names).take(pa.array(scene)),
        "detection_id": pa.array([f"{i:016x}" for i in rng.integers(0, 2**63, len(scene))]),
        "class_id": pa.array(class_ids),
        "class_name": pa.array(CLASSES).take(pa.array(class_ids)),
        "score": pa.array(rng.uniform(0.05, 1.0, len(scene)).astype(np.float32)),
        "geometry": pa.array(shapely.to_wkb(shapely.box(*bounds.T)), pa.binary()),
        "bbox": box,
        **{f"pixel_{k}": pa.array(pixels[:, i].astype(np.float32)) for i, k in enumerate(CORNERS)},
        "scene_crs": pa.array(["EPSG:32633"] * len(scene)),
        "scene_uri": pa.array([f"s3://archive/{n}.tif" for n in names]).take(pa.array(scene)),
        "acquired_at": pa.array(list(times), pa.timestamp("us", tz="UTC")).take(pa.array(scene)),
        "stac_item_id": pa.nulls(len(scene), pa.string()),
        "model_id": pa.array(["ships:resnet50_fpn:0123456789ab"] * len(scene)),
        "run_id": pa.array(["bench"] * len(scene)),
    }
    return pa.table(columns, schema=SCHEMA), counts


def ensure_archive(files: int) -> Path:
    """The archive's scene files and its compacted scene table, cached under bench/.cache."""
    root = CACHE / f"archive-{files}"
    if (root / "complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "detections").mkdir(parents=True)
    started = time.perf_counter()
    table, counts = archive_table(files)
    crs = CRS.from_user_input("OGC:CRS84").to_json_dict()
    entries, start = [], 0
    for count in counts:
        part = table.slice(start, int(count))
        start += int(count)
        entries.append(_write_archive_file(root, part, crs))
    index = pa.Table.from_pylist(entries, schema=INDEX_SCHEMA)
    compacted = root / "_ledger" / "_compacted"
    compacted.mkdir(parents=True)
    pq.write_table(index, compacted / "0000000000000000-bench.parquet", compression="zstd")
    (root / "complete").write_text("ok")
    print(f"archive_generated_s: {time.perf_counter() - started:.1f}")
    return root


def _write_archive_file(root: Path, part: pa.Table, crs: dict) -> dict:
    """One scene file (one row group) and its scene-table row, as a run records it."""
    scene_id = part.column("scene_id")[0].as_py()
    box = part.column("bbox").combine_chunks()
    extent = [
        float(pc.min(box.field("xmin")).as_py()),
        float(pc.min(box.field("ymin")).as_py()),
        float(pc.max(box.field("xmax")).as_py()),
        float(pc.max(box.field("ymax")).as_py()),
    ]
    meta = json.dumps(geo_metadata(crs, extent, ["Polygon"]))
    path = root / "detections" / f"{scene_id}.parquet"
    # As the run writes scene files (SceneFileWriter): no embedded Arrow schema.
    writer = pq.ParquetWriter(path, SCHEMA, compression="zstd", store_schema=False)
    writer.write_table(part)
    writer.add_key_value_metadata({"geo": meta})
    writer.close()
    blob_size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(blob_size - 8)
        footer = int.from_bytes(handle.read(4), "little")
    classes = pc.value_counts(part.column("class_name")).to_pylist()
    classes.sort(key=lambda c: c["values"])
    acquired = part.column("acquired_at")[0].as_py()
    return {
        "record_id": f"bench-{scene_id}", "scene_id": scene_id,
        "identity": f"s3://archive/{scene_id}.tif|1|2", "model_id": "ships:resnet50_fpn:0123",
        "settings_hash": "bench", "status": "done", "run_id": "bench", "recorded_at": 1.0,
        "detections": part.num_rows, "output": str(path),
        "path": f"detections/{scene_id}.parquet", "indexed": True, "crs": "OGC:CRS84",
        "xmin": extent[0], "ymin": extent[1], "xmax": extent[2], "ymax": extent[3],
        "time_start": acquired, "time_end": acquired,
        "classes": [c["values"] for c in classes], "class_counts": [c["counts"] for c in classes],
        "bytes": blob_size, "footer_bytes": footer, "tiles_without_data": 0,
    }  # fmt: skip


def matching_row_group_bytes(found: Detections, where: QueryFilter) -> int:
    """The bytes of every row group whose statistics may hold a passing row (all columns)."""
    total = 0
    for path, _ in candidates(found, where):  # a file the index rules out has none
        metadata = pq.read_metadata(path)
        for i in range(metadata.num_row_groups):
            if may_match(row_group_stats(metadata, i), where):
                group = metadata.row_group(i)
                columns = range(group.num_columns)
                total += sum(group.column(c).total_compressed_size for c in columns)
    return total


def archive(files: int) -> None:
    root = ensure_archive(files)
    where = QueryFilter(bbox=one_percent_box())
    dataset_bytes = sum(f.stat().st_size for f in root.rglob("*.parquet"))
    counted = open_detections(str(root), count_reads=True)
    index_bytes, index_requests = counted.reads.bytes, counted.reads.requests
    result = query_detections(counted, where)
    read = counted.reads.bytes
    matching = matching_row_group_bytes(counted, where)
    print(f"archive_files: {len(counted.files)}")
    print(f"archive_rows: {pc.sum(counted.index.column('detections')).as_py()}")
    print(f"archive_bytes: {dataset_bytes}")
    print(f"archive_index_bytes: {index_bytes} ({index_requests} request(s))")
    print(f"archive_rows_returned: {result.num_rows}")
    print(f"archive_files_opened: {len(candidates(counted, where))}")
    print(f"archive_bytes_read: {read}")
    print(f"archive_bytes_read_fraction: {read / dataset_bytes:.4f}")
    print(f"archive_matching_row_group_bytes: {matching}")
    print(f"archive_bytes_read_over_target: {read / (2 * matching + index_bytes):.3f}")
    with_index, without = [], []
    for _ in range(3):
        started = time.perf_counter()
        fast = query_detections(str(root), where)
        with_index.append(time.perf_counter() - started)
        started = time.perf_counter()
        slow = query_detections(open_detections(str(root), use_index=False), where)
        without.append(time.perf_counter() - started)
        assert fast.equals(slow) and fast.num_rows == result.num_rows
    print(f"archive_query_1pct_s: {statistics.median(with_index):.3f}")
    print(f"archive_query_1pct_noindex_s: {statistics.median(without):.3f}")
    speedup = statistics.median(without) / statistics.median(with_index)
    print(f"archive_index_speedup: {speedup:.1f}")


if __name__ == "__main__":
    main()
