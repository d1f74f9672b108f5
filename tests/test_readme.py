"""The README's query recipes, run verbatim: each gives the same rows as `georetina query`."""

import os
import re
import shlex
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.csv
import pytest
from detections_data import scene_rows, write_indexed, write_indexed_dataset

from pipeline.io.ledger import Ledger
from pipeline.io.query import QueryFilter, count_detections, query_detections

README = Path(__file__).parents[1] / "README.md"
RECIPE = re.compile(r"<!-- recipe: (\S+) -->\s*```(\w+)\n(.*?)```", re.DOTALL)
# The filter every recipe spells out in its own way.
WHERE = QueryFilter(
    bbox=(15.005, 42.0, 15.035, 42.006),
    classes=("ship",),
    min_score=0.6,
    since=datetime(2026, 5, 29, tzinfo=UTC),
)


def recipes() -> dict[str, str]:
    found = {name: code for name, _, code in RECIPE.findall(README.read_text())}
    assert set(found) >= {"cli", "geopandas", "duckdb", "duckdb-count", "polars"}
    assert set(found) >= {f"compacted-{way}" for way in ("cli", "duckdb", "polars", "geopandas")}
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding ``out/``, as a user's would after a run."""
    folder = tmp_path_factory.mktemp("readme")
    write_indexed_dataset(folder / "out", scenes=2, count=300)
    Ledger(str(folder / "out")).compact()  # the index: one compacted file and two fragments
    for k in (2, 3):
        write_indexed(folder / "out", scene_rows(k, 300))
    return folder


SINCE_29_MAY = ["s1.parquet", "s2.parquet", "s3.parquet"]  # s0 was acquired on 28 May


def names(paths) -> list[str]:
    return sorted(Path(p).name for p in paths)


@pytest.fixture(scope="module")
def cli_results(workdir) -> tuple[set[str], list[tuple[str, str, int]]]:
    """Run the README's shell lines as they are, with the venv's `georetina` on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for line in recipes()["cli"].strip().splitlines():
        assert line.startswith("georetina query ")
        done = subprocess.run(
            shlex.split(line), cwd=workdir, env=env, capture_output=True, text=True, check=True
        )
        outputs.append(done.stdout)
    rows = pyarrow.csv.read_csv(workdir / "ships.csv")
    counts = []
    for line in outputs[1].strip().splitlines()[1:-1]:  # header ... 'N row(s)'
        scene_id, class_name, count = line.split()
        counts.append((scene_id, class_name, int(count)))
    return set(rows.column("detection_id").to_pylist()), counts


def run_recipe(name: str, workdir: Path, monkeypatch) -> dict:
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(recipes()[name], f"README.md:{name}", "exec"), namespace)
    return namespace


def test_the_cli_recipe_matches_the_library(workdir, cli_results):
    ids, counts = cli_results
    expected = query_detections(str(workdir / "out"), WHERE)
    assert ids == set(expected.column("detection_id").to_pylist())
    assert 10 < len(ids) < 1200 / 4  # a real selection, not everything
    per_scene = count_detections(str(workdir / "out"), WHERE).to_pylist()
    assert counts == [(r["scene_id"], r["class_name"], r["count"]) for r in per_scene]


def test_geopandas_recipe(workdir, cli_results, monkeypatch):
    namespace = run_recipe("geopandas", workdir, monkeypatch)
    ships = namespace["ships"]
    assert names(namespace["files"]) == SINCE_29_MAY  # the index ruled out s0
    assert set(ships.detection_id) == cli_results[0]
    assert len(ships) == len(cli_results[0])
    assert ships.crs.to_string() == "OGC:CRS84"


def test_duckdb_recipe(workdir, cli_results, monkeypatch):
    namespace = run_recipe("duckdb", workdir, monkeypatch)
    ships = namespace["ships"]
    assert names(namespace["files"]) == SINCE_29_MAY
    assert set(ships.detection_id) == cli_results[0]
    assert len(ships) == len(cli_results[0])
    assert ships.wkt.iloc[0].startswith("POLYGON ((15.")
    assert set(ships.crs) == {"OGC:CRS84"}


def test_duckdb_count_recipe(workdir, cli_results, monkeypatch):
    per_scene = run_recipe("duckdb-count", workdir, monkeypatch)["per_scene"]
    rows = [(r.scene_id, r.class_name, int(r.count)) for r in per_scene.itertuples()]
    assert rows == cli_results[1]


def test_polars_recipe(workdir, cli_results, monkeypatch):
    namespace = run_recipe("polars", workdir, monkeypatch)
    ships = namespace["ships"]
    assert names(namespace["index"]["path"]) == SINCE_29_MAY
    assert set(ships["detection_id"].to_list()) == cli_results[0]
    assert ships.height == len(cli_results[0])


# --------------------------------------------------------------------------------------------
# The compacted dataset (`georetina compact`)
# --------------------------------------------------------------------------------------------


def run_shell_recipe(name: str, workdir: Path) -> list[str]:
    """A recipe's `georetina` lines run as they are, with the venv's `georetina` on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for line in recipes()[name].strip().splitlines():
        assert line.startswith("georetina ")
        done = subprocess.run(
            shlex.split(line), cwd=workdir, env=env, capture_output=True, text=True, check=True
        )
        outputs.append(done.stdout)
    return outputs


@pytest.fixture(scope="module")
def compacted(workdir) -> set[str]:
    """``compacted/`` made by the README's own command; the ids its query line wrote."""
    outputs = run_shell_recipe("compacted-cli", workdir)
    assert outputs[0].startswith("compacted out -> compacted: ")
    rows = pyarrow.csv.read_csv(workdir / "ships-compacted.csv")
    return set(rows.column("detection_id").to_pylist())


def all_cells(workdir: Path) -> set[str]:
    return {p.parent.parent.name.removeprefix("cell=") for p in workdir.glob("compacted/*/*/*")}


@pytest.mark.timeout(120)
def test_the_compacted_cli_recipe_matches_the_per_scene_files(workdir, cli_results, compacted):
    assert compacted == cli_results[0]
    assert len(all_cells(workdir)) > 4  # small cells: pruning has something to skip


@pytest.mark.timeout(120)
def test_compacted_duckdb_recipe_skips_partitions(workdir, cli_results, compacted, monkeypatch):
    import duckdb

    namespace = run_recipe("compacted-duckdb", workdir, monkeypatch)
    ships = namespace["ships"]
    assert set(ships.detection_id) == cli_results[0] and len(ships) == len(cli_results[0])
    assert 0 < len(namespace["cells"]) < len(all_cells(workdir))
    # DuckDB itself leaves out the files whose cell or day cannot match (it says how many
    # files of those its partition filters kept it scanned).
    plan = duckdb.sql("explain analyze " + namespace["query"]).fetchall()[0][1]
    scanned, kept = map(int, re.search(r"Scanning Files: (\d+)/(\d+)", plan).groups())
    files = len(list(workdir.glob("compacted/cell=*/date=*/part.parquet")))
    assert 0 < scanned <= kept < files


@pytest.mark.timeout(120)
def test_compacted_polars_recipe(workdir, cli_results, compacted, monkeypatch):
    ships = run_recipe("compacted-polars", workdir, monkeypatch)["ships"]
    assert set(ships["detection_id"].to_list()) == cli_results[0]
    assert ships.height == len(cli_results[0])


@pytest.mark.timeout(120)
def test_compacted_geopandas_recipe(workdir, cli_results, compacted, monkeypatch):
    namespace = run_recipe("compacted-geopandas", workdir, monkeypatch)
    ships = namespace["ships"]
    assert set(ships.detection_id) == cli_results[0] and len(ships) == len(cli_results[0])
    files = list(workdir.glob("compacted/cell=*/date=*/part.parquet"))
    assert 0 < len(namespace["files"]) < len(files)  # the cells and days ruled the rest out
    assert ships.crs.to_string() == "OGC:CRS84"
