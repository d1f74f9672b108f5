"""Tiling and reading: memory flat in the raster's size, reads as fast as bare rasterio.

1. The real job (the `threshold` detector, which finds nothing in these scenes, so the CPU
   goes to tiling and reading) over every tile of a 4096^2, a 16384^2 and a 32768^2 COG,
   each in a fresh process with its own embedded Ray. Peak memory of the whole process tree
   (driver, Ray's daemons and workers) is sampled every 0.1 s as PSS, so Ray's shared object
   store pages count once. -> peak_rss_ratio_32k_over_4k, and _32k_over_16k: past the
   first few hundred tiles (the 4k scene has 81) the read-ahead budget is full, and from
   there on nothing grows.
2. Our tile reads (`read_tiles`, as a read task runs them: chunks of 16 tiles through one
   open dataset, read straight into the batch's 3 x H x W slots, masks, uint8) against a
   bare rasterio loop reading the same windows of the same file (one open,
   `read(window=...)`, band-first), on a 4096^2 COG of noise (imagery's entropy), passes
   alternated, best of five each. -> read_over_rasterio
3. The same over s3:// on an S3-compatible server (moto) on loopback. -> read_over_rasterio_s3
4. ``--case resampled`` (model.resolution_m): the job reading the 4096^2 and 16384^2 COGs
   (0.5 m) at 0.7 m, a factor no overview matches (every read averages full-resolution
   blocks), against the plain 16384^2 job -> peak_pss_ratio_resampled_16k_over_4k,
   peak_pss_ratio_resampled_over_plain_16k; and our resampled reads of the noise COG against
   a bare rasterio loop making the same resampled reads (``out_shape`` and ``resampling`` over
   the same scene windows), at 0.7 m (average), 1.0 m (average, GDAL takes the 2x overview)
   and 0.35 m (bilinear, upsampled) -> read_over_rasterio_resampled_{0.7,1.0,0.35}m.

Run: .venv/bin/python bench/tiling.py [--workdir DIR] [--case all|resampled]
(COGs are made once and kept in DIR)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import rasterio
import rasterio.shutil
from rasterio.windows import Window

from pipeline.io.rasters import close_shared_rasters, inspect_raster
from pipeline.io.reads import read_tiles
from pipeline.io.synthetic import write_scene
from pipeline.ops.grid import Resample
from pipeline.ops.tiles import plan_tiles

TILE, OVERLAP, CHUNK = 512, 64, 16


def make_cog(path: Path, size: int, noise: bool) -> Path:
    """A real COG (GDAL's COG driver: tiled, overviews, DEFLATE), made once and kept.

    ``noise`` gives pixels with the entropy of imagery (decompression costs what it costs
    on real scenes); without it a gradient, cheap to write at 32k x 32k.
    """
    if path.exists():
        return path
    plain = path.with_suffix(".plain.tif")
    write_scene(plain, size, [], block=512, overviews=False, noise=noise)
    rasterio.shutil.copy(
        plain, path, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512, NUM_THREADS="ALL_CPUS"
    )
    plain.unlink()
    return path


# ---------------------------------------------------------------------------- memory


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(parent, []).append(int(entry))
    return tree


def tree_pss_bytes(root: int) -> int:
    tree, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total


def measure_job(scene: str, output: str, resolution_m: str = "") -> None:
    """Child process: run the job on an embedded Ray and print the tree's peak PSS."""
    import ray

    from pipeline.config import parse_job
    from pipeline.jobs.ray_session import start_embedded_ray
    from pipeline.jobs.run import run_job

    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_pss_bytes(os.getpid()))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start_embedded_ray(num_cpus=os.cpu_count())
    spec = parse_job(
        {
            "inputs": [scene],
            "model": {"kind": "threshold", "resolution_m": float(resolution_m or 0) or None},
            "tiling": {"tile_size": TILE, "overlap": OVERLAP, "tiles_per_read_task": CHUNK},
            "detect": {"batch_size": 16, "num_cpus_per_actor": 0.5},
            "output": {"path": output},
        }
    )
    report = run_job(spec, force=True, progress=lambda line: None)
    done.set()
    sampler.join()
    ray.shutdown()
    print(json.dumps({"peak": peak[0], "tiles": report.tiles, "done": report.count("done")}))


def peak_of_job(scene: Path, workdir: Path, resolution_m: float | None = None) -> dict:
    job = [str(scene), str(workdir / "out"), str(resolution_m or "")]
    result = subprocess.run(
        [sys.executable, __file__, "--measure-job", *job],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- reads


def windows_of(path: str) -> list:
    with rasterio.open(path) as dataset:
        return plan_tiles(dataset.width, dataset.height, TILE, OVERLAP)


def ours(uri: str, tiles: list, resample: Resample | None = None) -> float:
    close_shared_rasters()  # start cold, as a job does: no blocks cached by an earlier pass
    started = time.perf_counter()
    for start in range(0, len(tiles), CHUNK):
        windows = [t.window for t in tiles[start : start + CHUNK]]
        read_tiles(uri, windows, [1, 2, 3], (0.0, 255.0), None, TILE, 300.0, resample)
    return len(tiles) / (time.perf_counter() - started)


def bare_rasterio(uri: str, tiles: list, resample: Resample | None = None) -> float:
    from rasterio.enums import Resampling

    started = time.perf_counter()
    with rasterio.open(uri) as dataset:
        for tile in tiles:
            if resample is None:
                dataset.read(window=Window(tile.col_off, tile.row_off, tile.width, tile.height))
                continue
            # The same resampled read, clipped to the grid as ours are.
            width = min(tile.width, resample.width - tile.col_off)
            height = min(tile.height, resample.height - tile.row_off)
            window = Window(*resample.scene_window(tile.col_off, tile.row_off, width, height))
            dataset.read(
                window=window,
                out_shape=(3, height, width),
                resampling=Resampling[resample.method],
            )
    return len(tiles) / (time.perf_counter() - started)


def read_ratio(
    uri: str, tiles: list, passes: int = 5, resample: Resample | None = None
) -> tuple[float, float]:
    best_ours, best_bare = 0.0, 0.0
    for _ in range(passes):
        best_bare = max(best_bare, bare_rasterio(uri, tiles, resample))
        best_ours = max(best_ours, ours(uri, tiles, resample))
    return best_ours, best_bare


def resampled_case(workdir: Path, plain_16k: dict | None = None) -> None:
    """Memory and read speed of scenes read at another resolution (model.resolution_m);
    ``plain_16k``: the plain 16k job's run when the whole bench has just measured it."""
    small = make_cog(workdir / "cog_4096.tif", 4096, noise=False)
    middle = make_cog(workdir / "cog_16384.tif", 16384, noise=False)
    imagery = make_cog(workdir / "cog_4096_noise.tif", 4096, noise=True)
    runs = {
        "resampled_4k": peak_of_job(small, workdir, 0.7),
        "resampled_16k": peak_of_job(middle, workdir, 0.7),
        "16k": plain_16k or peak_of_job(middle, workdir),
    }
    for name, run in runs.items():
        print(f"tiles_{name}: {run['tiles']}")
        print(f"peak_pss_{name}_mb: {run['peak'] / 2**20:.0f}")
    resampled, plain = runs["resampled_16k"]["peak"], runs["16k"]["peak"]
    print(f"peak_pss_ratio_resampled_16k_over_4k: {resampled / runs['resampled_4k']['peak']:.3f}")
    print(f"peak_pss_ratio_resampled_over_plain_16k: {resampled / plain:.3f}")
    for target in (0.7, 1.0, 0.35):
        info = inspect_raster("bench", str(imagery), None, None, resolution=(target, 0.1))
        tiles = plan_tiles(info.width, info.height, TILE, OVERLAP)
        best_ours, best_bare = read_ratio(str(imagery), tiles, resample=info.resample)
        print(f"read_tiles_per_s_resampled_{target}m: {best_ours:.1f} ({len(tiles)} tiles)")
        print(f"rasterio_tiles_per_s_resampled_{target}m: {best_bare:.1f}")
        print(f"read_over_rasterio_resampled_{target}m: {best_ours / best_bare:.3f}")


def with_s3_server(cog: Path) -> tuple[str, object]:
    import logging
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per range request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_S3_ENDPOINT": f"127.0.0.1:{port}",
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
        }
    )
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(str(cog), f"bench/{cog.name}")
    return f"s3://bench/{cog.name}", server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--case", choices=["all", "resampled"], default="all")
    parser.add_argument("--measure-job", nargs=3, metavar=("SCENE", "OUTPUT", "RESOLUTION_M"))
    args = parser.parse_args()
    if args.measure_job:
        measure_job(*args.measure_job)
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="georetina-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.case == "resampled":
        resampled_case(workdir)
        return
    small = make_cog(workdir / "cog_4096.tif", 4096, noise=False)
    middle = make_cog(workdir / "cog_16384.tif", 16384, noise=False)
    large = make_cog(workdir / "cog_32768.tif", 32768, noise=False)
    imagery = make_cog(workdir / "cog_4096_noise.tif", 4096, noise=True)

    runs = {name: peak_of_job(cog, workdir) for name, cog in (("4k", small), ("16k", middle))}
    runs["32k"] = peak_of_job(large, workdir)
    for name, run in runs.items():
        print(f"tiles_{name}: {run['tiles']}")
        print(f"peak_pss_{name}_mb: {run['peak'] / 2**20:.0f}")
    print(f"peak_rss_ratio_32k_over_4k: {runs['32k']['peak'] / runs['4k']['peak']:.3f}")
    print(f"peak_rss_ratio_32k_over_16k: {runs['32k']['peak'] / runs['16k']['peak']:.3f}")

    tiles = windows_of(str(imagery))
    local_ours, local_bare = read_ratio(str(imagery), tiles)
    print(f"read_tiles_per_s: {local_ours:.1f}")
    print(f"rasterio_tiles_per_s: {local_bare:.1f}")
    print(f"read_over_rasterio: {local_ours / local_bare:.3f}")
    uri, server = with_s3_server(imagery)
    try:
        s3_ours, s3_bare = read_ratio(uri, tiles)
    finally:
        server.stop()
    print(f"read_tiles_per_s_s3: {s3_ours:.1f}")
    print(f"rasterio_tiles_per_s_s3: {s3_bare:.1f}")
    print(f"read_over_rasterio_s3: {s3_ours / s3_bare:.3f}")
    resampled_case(workdir, runs["16k"])


if __name__ == "__main__":
    main()
