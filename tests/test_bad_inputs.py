"""The bad-input catalogue: one table, one run per case on the session's local Ray.

Each case is an archive with something wrong in it, beside one good scene. Either the job is
refused up front (the expected error, and nothing written), or it runs: the bad scenes end
as the table says (failed with the expected text, or done with the expected output) and the
good scene's rows are exactly those of a clean run of it alone.

The tiling stage's bad inputs are in the table too (`tiling: ...`): no CRS, no geotransform,
truncated, unreachable, south-up, rotated, 1 and 5 bands, uint16 with nodata, float32 NaN,
palette, alpha, smaller than a tile, all nodata. Also covered in detail elsewhere:
- rasters without CRS / geotransform, too few bands, band out of range, alpha as a channel,
  GCP-only, truncated, not a raster, unreachable URI: tests/test_tiling.py
  (test_bad_rasters_fail_with_the_scene_named, test_band_out_of_range,
  test_gcp_only_raster_is_refused_with_the_fix, test_truncated_file_fails_in_preflight,
  test_not_a_raster, test_unreachable_uri_fails_quickly_with_the_scene_named, ...);
- several bad scenes in one job next to a good one:
  tests/test_end_to_end.py::test_bad_scenes_fail_by_name_and_the_rest_is_done;
- misspelt keys and bad values, all reported at once: tests/test_config.py;
- bad list files and STAC sources: tests/test_inputs.py;
- pickled, corrupt, missing, wrong-sha256 or wrong-shape checkpoints: tests/test_detect.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import geopandas
import numpy as np
import pytest
import torch
from conftest import write_raster
from faults import output_rows, threshold_job, write_archive
from rasterio.transform import Affine

from pipeline.config import parse_job
from pipeline.errors import CheckpointError, GeoRetinaError, JobSpecError
from pipeline.io.ledger import Ledger
from pipeline.io.synthetic import plan_objects, write_scene
from pipeline.jobs.run import run_job
from pipeline.model.build import build_model

pytestmark = pytest.mark.ray

GOOD = "scene_000.tif"


@dataclass
class Case:
    """``build(folder, good)`` writes the bad input and returns the job's inputs and any
    settings; ``refused`` is the error text of a job refused up front; ``scenes`` maps an
    input's file name to (status, text in its error) for jobs that run."""

    build: Callable[[Path, Path], tuple[list[str], dict]]
    refused: tuple[type[Exception], str] | None = None
    scenes: dict[str, tuple[str, str]] = field(default_factory=dict)
    check: Callable[[object, Path], None] | None = None


def planted_in(folder: Path, name: str, crs: str, origin: tuple[float, float], pixel: float):
    objects = plan_objects(400, 256, 48, count=6, seed=9, max_side=30)
    write_scene(
        folder / name, 400, objects, crs=crs, origin=origin, pixel_size=pixel, seed=9, block=128,
        overviews=False,
    )  # fmt: skip
    return folder / name


def mixed_crs(folder: Path, good: Path) -> tuple[list[str], dict]:
    utm34 = planted_in(folder, "utm34.tif", "EPSG:32634", (400_000.0, 4_650_000.0), 0.5)
    lonlat = planted_in(folder, "lonlat.tif", "EPSG:4326", (14.0, 42.0), 0.00001)
    return [str(good), str(utm34), str(lonlat)], {}


def check_mixed_crs(report: object, output: Path) -> None:
    crs_of = {}
    for scene in report.scenes:
        frame = geopandas.read_parquet(scene.output)
        assert frame.crs.to_string() == "OGC:CRS84" and len(frame) == scene.detections > 0
        crs_of[Path(scene.uri).name] = set(frame["scene_crs"])
        assert frame.geometry.bounds["minx"].between(-180, 180).all()
    assert crs_of == {
        GOOD: {"EPSG:32633"},
        "utm34.tif": {"EPSG:32634"},
        "lonlat.tif": {"EPSG:4326"},
    }


def duplicates(folder: Path, good: Path) -> tuple[list[str], dict]:
    listed = folder / "list.txt"
    listed.write_text(f"{good}\n{good}\n")
    return [str(good), str(good), {"list": str(listed)}, str(good.parent / "scene_0*.tif")], {}


def check_one_scene(report: object, output: Path) -> None:
    assert len(report.scenes) == 1 and report.count("done") == 1
    assert len(list((output / "detections").glob("*.parquet"))) == 1


def across_the_antimeridian(folder: Path, good: Path) -> tuple[list[str], dict]:
    """A UTM zone 60 scene near the equator with the ±180° line through a planted object."""
    from pyproj import Transformer

    objects = plan_objects(400, 256, 48, count=6, seed=9, max_side=30)
    middle_x = (objects[0].x0 + objects[0].x1) / 2
    top = 55_500.0
    northing = top - (objects[0].y0 + objects[0].y1) / 2
    lat = Transformer.from_crs("EPSG:32660", "EPSG:4326", always_xy=True).transform(
        833_966.0, northing
    )[1]
    easting = Transformer.from_crs("EPSG:4326", "EPSG:32660", always_xy=True).transform(180.0, lat)[
        0
    ]
    write_scene(
        folder / "dateline.tif", 400, objects, crs="EPSG:32660",
        origin=(easting - middle_x, top), pixel_size=1.0, seed=9, block=128, overviews=False,
    )  # fmt: skip
    return [str(good), str(folder / "dateline.tif")], {}


def check_antimeridian(report: object, output: Path) -> None:
    [scene] = [s for s in report.scenes if Path(s.uri).name == "dateline.tif"]
    frame = geopandas.read_parquet(scene.output)
    assert len(frame) == 6  # every planted object, once
    split = frame[frame.geometry.geom_type == "MultiPolygon"]
    assert len(split) >= 1  # objects on the line: two parts, one each side of ±180°
    for geometry in split.geometry:
        assert tuple(geometry.bounds[::2]) == (-180.0, 180.0)
        assert all(part.bounds[2] - part.bounds[0] < 0.001 for part in geometry.geoms)
    whole = frame[frame.geometry.geom_type == "Polygon"].geometry.bounds
    assert ((whole.maxx - whole.minx) < 0.001).all()  # no box wraps around the globe


def beside_good(write: Callable[[Path], Path | str]) -> Callable:
    """A case builder: the good scene plus the raster (or URI) ``write`` makes."""

    def build(folder: Path, good: Path) -> tuple[list[str], dict]:
        return [str(good), str(write(folder))], {}

    return build


def truncated(folder: Path) -> Path:
    path = write_raster(folder / "truncated.tif", width=512, height=512, compress="deflate")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


GREY = {i: (i, i, i, 255) for i in range(256)}
TILING_CASES = {  # name: (file name, writer, status, text in the error)
    # Refused, each with the scene named and the reason:
    "no CRS": ("nocrs.tif", lambda f: write_raster(f / "nocrs.tif", crs=None), "failed", "no CRS"),
    "no geotransform": (
        "pixels.tif",
        lambda f: write_raster(f / "pixels.tif", transform=None),
        "failed",
        "has no geotransform",
    ),
    "truncated file": ("truncated.tif", truncated, "failed", "truncated"),
    "unreachable uri": (
        "far-away.tif",
        lambda f: "http://127.0.0.1:9/far-away.tif",
        "failed",
        "cannot be read",
    ),
    # Handled:
    "south-up transform": (
        "southup.tif",
        lambda f: write_raster(
            f / "southup.tif", transform=Affine(0.5, 0, 500_000, 0, 0.5, 4_600_000)
        ),
        "done",
        "",
    ),
    "rotated transform": (
        "rotated.tif",
        lambda f: write_raster(
            f / "rotated.tif",
            transform=Affine.translation(500_000, 4_600_000)
            @ Affine.rotation(20)
            @ Affine.scale(0.5, -0.5),
        ),
        "done",
        "",
    ),
    "1-band image": ("grey.tif", lambda f: write_raster(f / "grey.tif", count=1), "done", ""),
    "5-band image": ("multi.tif", lambda f: write_raster(f / "multi.tif", count=5), "done", ""),
    "uint16 with nodata": (
        "u16.tif",
        lambda f: write_raster(f / "u16.tif", dtype="uint16", nodata=0),
        "done",
        "",
    ),
    "float32 with NaN": (
        "nan.tif",
        lambda f: write_raster(
            f / "nan.tif", dtype="float32", data=np.full((3, 256, 256), np.nan, np.float32)
        ),
        "done",
        "",
    ),
    "palette image": (
        "palette.tif",
        lambda f: write_raster(f / "palette.tif", count=1, colormap=GREY, photometric="palette"),
        "done",
        "",
    ),
    "alpha band": (
        "alpha.tif",
        lambda f: write_raster(f / "alpha.tif", count=4, alpha="YES"),
        "done",
        "",
    ),
    "smaller than a tile": (
        "tiny.tif",
        lambda f: write_raster(f / "tiny.tif", width=40, height=30),
        "done",
        "",
    ),
    "all nodata": (
        "empty.tif",
        lambda f: write_raster(f / "empty.tif", nodata=0, data=np.zeros((3, 256, 256), np.uint8)),
        "done",
        "",
    ),
}


def zero_byte(folder: Path, good: Path) -> tuple[list[str], dict]:
    (folder / "empty.tif").write_bytes(b"")
    return [str(good), str(folder / "empty.tif")], {}


def text_named_tif(folder: Path, good: Path) -> tuple[list[str], dict]:
    (folder / "notes.tif").write_text("not a raster")
    return [str(good), str(folder / "notes.tif")], {}


def glob_matching_nothing(folder: Path, good: Path) -> tuple[list[str], dict]:
    return [str(good), str(folder / "nothing-*.tif")], {}


def empty_inputs(folder: Path, good: Path) -> tuple[list[str], dict]:
    return [], {}


def huge_tile(folder: Path, good: Path) -> tuple[list[str], dict]:
    return [str(good)], {"tiling": {"tile_size": 8192, "overlap": 64}}


def object_store_too_small(folder: Path, good: Path) -> tuple[list[str], dict]:
    # Passes validation (each block fits the budget), but no local object store is 10 TB.
    return [str(good)], {"detect": {"inflight_mb_per_actor": 10_000_000}}


def _retinanet_checkpoint(folder: Path, edit: Callable[[dict], dict]) -> dict:
    model = {"kind": "retinanet", "backbone": "resnet18_fpn", "classes": ["object"]}
    settings = parse_job({"inputs": ["x"], "model": model, "output": {"path": "o"}}).model
    state = build_model(settings, 256).state_dict()
    torch.save(edit(state), folder / "edited.pt")
    return {"model": {**model, "checkpoint": str(folder / "edited.pt")}}


def checkpoint_missing_keys(folder: Path, good: Path) -> tuple[list[str], dict]:
    edit = lambda state: {k: v for k, v in state.items() if not k.startswith("head.")}  # noqa: E731
    return [str(good)], _retinanet_checkpoint(folder, edit)


def checkpoint_extra_keys(folder: Path, good: Path) -> tuple[list[str], dict]:
    edit = lambda state: {**state, "head.extra.weight": torch.zeros(3)}  # noqa: E731
    return [str(good)], _retinanet_checkpoint(folder, edit)


CASES = {
    "mixed-crs archive": Case(
        mixed_crs,
        scenes={"utm34.tif": ("done", ""), "lonlat.tif": ("done", "")},
        check=check_mixed_crs,
    ),
    "duplicate uris": Case(duplicates, check=check_one_scene),
    "scene across the antimeridian": Case(
        across_the_antimeridian,
        scenes={"dateline.tif": ("done", "")},
        check=check_antimeridian,
    ),
    "zero-byte file": Case(
        zero_byte, scenes={"empty.tif": ("failed", "cannot be read as a raster")}
    ),
    "text file named .tif": Case(
        text_named_tif, scenes={"notes.tif": ("failed", "cannot be read as a raster")}
    ),
    "glob matching nothing": Case(glob_matching_nothing, check=check_one_scene),
    "empty input list": Case(
        empty_inputs, refused=(JobSpecError, "inputs: List should have at least 1 item")
    ),
    "tile too big for memory": Case(
        huge_tile,
        refused=(
            JobSpecError,
            "a read task of 3 tile(s) of 8192 px holds 768 MB, more than "
            "detect.inflight_mb_per_actor (64 MB)",
        ),
    ),
    "in-flight tiles beyond the object store": Case(
        object_store_too_small,
        refused=(GeoRetinaError, "more than the cluster's object store"),
    ),
    "checkpoint missing keys": Case(
        checkpoint_missing_keys,
        refused=(CheckpointError, "key(s) missing, e.g. ['head."),
    ),
    "checkpoint with extra keys": Case(
        checkpoint_extra_keys,
        refused=(CheckpointError, "1 unexpected key(s), e.g. ['head.extra.weight']"),
    ),
}


CASES.update(
    {
        f"tiling: {name}": Case(beside_good(write), scenes={file_name: (status, text)})
        for name, (file_name, write, status, text) in TILING_CASES.items()
    }
)


@pytest.fixture(scope="module")
def good(ray_session, tmp_path_factory) -> tuple[Path, dict[str, list[tuple]]]:
    """One good scene and the rows of a clean run of it alone."""
    folder = tmp_path_factory.mktemp("good")
    write_archive(folder, 1, size=400)
    output = folder / "out"
    report = run_job(parse_job(threshold_job([folder / GOOD], output)), progress=lambda _: None)
    assert report.count("done") == 1
    return folder / GOOD, output_rows(str(output))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_catalogue(name, good, tmp_path):
    case = CASES[name]
    good_path, good_rows = good
    inputs, settings = case.build(tmp_path, good_path)
    output = tmp_path / "out"
    job = threshold_job(inputs, output)
    for key, value in settings.items():
        job[key] = {**job.get(key, {}), **value}
    if case.refused is not None:
        kind, text = case.refused
        with pytest.raises(kind) as refused:
            run_job(parse_job(job), progress=lambda _: None)
        assert text in str(refused.value)
        assert not (output / "detections").exists() and not (output / "_ledger").exists()
        return
    report = run_job(parse_job(job), progress=lambda _: None)
    by_name = {Path(s.uri).name: s for s in report.scenes}
    for file_name, (status, text) in case.scenes.items():
        scene = by_name[file_name]
        assert scene.status == status, scene
        if status == "failed":
            assert scene.error.startswith(f"scene {scene.scene_id}: ") and text in scene.error
    assert by_name[GOOD].status == "done"
    rows = output_rows(str(output))
    assert rows[by_name[GOOD].scene_id] == good_rows[by_name[GOOD].scene_id]
    statuses = {r.scene_id: r.status for r in Ledger(str(output)).records()}
    assert statuses == {s.scene_id: s.status for s in report.scenes}
    if case.check:
        case.check(report, output)
