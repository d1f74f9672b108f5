"""Inputs beyond paths and globs: list files, a static STAC catalog, a STAC API search.

The catalog is written with pystac over rasters the test makes; the API is a small STAC
item-search server on loopback (stdlib http.server), reached by pystac-client over HTTP.
"""

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import geopandas
import pyarrow.parquet as pq
import pystac
import pytest
import yaml
from servers import RangeServer

from pipeline.config import ListInput, StacInput, load_job, parse_job
from pipeline.errors import GeoRetinaError, JobSpecError
from pipeline.io.discovery import discover_scenes, parse_uri_list
from pipeline.io.stac import stac_scenes
from pipeline.io.synthetic import plan_objects, write_scene
from pipeline.jobs.run import run_job

OUT = {"path": "out"}


# --------------------------------------------------------------------------------------------
# Job spec
# --------------------------------------------------------------------------------------------


def test_inputs_mix_paths_lists_and_stac():
    spec = parse_job(
        {
            "inputs": [
                "a/*.tif",
                {"list": "uris.txt"},
                {"stac": {"catalog": "cat/catalog.json", "asset": "visual"}},
                {
                    "stac": {
                        "api": "https://stac.example/v1",
                        "asset": "visual",
                        "collections": ["sentinel-2-l2a"],
                        "bbox": [5, 45, 6, 46],
                        "datetime": "2026-06-01T00:00:00Z/..",
                    }
                },
            ],
            "output": OUT,
        }
    )
    path, listed, catalog, api = spec.inputs
    assert path == "a/*.tif"
    assert isinstance(listed, ListInput) and listed.uris == "uris.txt"
    assert isinstance(catalog, StacInput) and catalog.stac.catalog == "cat/catalog.json"
    assert api.stac.window() == (datetime(2026, 6, 1, tzinfo=UTC), None)


@pytest.mark.parametrize(
    ("item", "path", "message"),
    [
        ({"stac": {"asset": "visual"}}, "inputs.0.stac", "exactly one of 'catalog'"),
        (
            {"stac": {"api": "http://x", "catalog": "c.json", "asset": "v"}},
            "inputs.0.stac",
            "exactly one",
        ),
        ({"stac": {"api": "http://x", "asset": "v", "bbox": [6, 45, 5, 46]}}, "bbox", "west"),
        ({"stac": {"api": "http://x", "asset": "v", "datetime": "June"}}, "datetime", "RFC 3339"),
        (
            {"stac": {"api": "http://x", "asset": "v", "datetime": "2026-06-02/2026-06-01"}},
            "datetime",
            "ends before",
        ),
        (
            {"stac": {"api": "http://x", "asset": "v", "datetime": "..", "lookback_days": 1}},
            "inputs.0.stac",
            "not both",
        ),
        ({"stac": {"api": "http://x"}}, "inputs.0.stac.asset", "required"),
        ({"list": "u.txt", "extra": 1}, "inputs.0.list.extra", "not permitted"),
        ({"glob": "*.tif"}, "inputs.0", "{list: FILE} or {stac"),
    ],
)
def test_bad_input_sources_name_their_field(item, path, message):
    with pytest.raises(JobSpecError) as caught:
        parse_job({"inputs": [item], "output": OUT})
    text = str(caught.value)
    assert path in text and message in text, text


def test_lookback_window_ends_now():
    spec = parse_job(
        {"inputs": [{"stac": {"api": "http://x", "asset": "v", "lookback_days": 2}}], "output": OUT}
    )
    now = datetime(2026, 6, 10, 3, 0, tzinfo=UTC)
    assert spec.inputs[0].stac.window(now) == (datetime(2026, 6, 8, 3, 0, tzinfo=UTC), now)


def test_list_and_catalog_paths_are_relative_to_the_job_file(tmp_path):
    (tmp_path / "jobs").mkdir()
    job = tmp_path / "jobs" / "j.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "inputs": [
                    {"list": "../lists/uris.txt"},
                    {"list": "s3://bucket/uris.txt"},
                    {"stac": {"catalog": "../stac/catalog.json", "asset": "image"}},
                ],
                "output": OUT,
            }
        )
    )
    listed, remote, catalog = load_job(job).inputs
    assert listed.uris == str(tmp_path / "lists" / "uris.txt")
    assert remote.uris == "s3://bucket/uris.txt"
    assert catalog.stac.catalog == str(tmp_path / "stac" / "catalog.json")


# --------------------------------------------------------------------------------------------
# List files
# --------------------------------------------------------------------------------------------


def test_uri_list_lines_comments_and_relative_paths():
    text = "# nightly drop\n\nscenes/a.tif\n  /abs/b.tif  \ns3://bucket/c.tif\n"
    assert parse_uri_list(text, "/data/lists") == [
        "/data/lists/scenes/a.tif",
        "/abs/b.tif",
        "s3://bucket/c.tif",
    ]
    assert parse_uri_list("d.tif\n", "s3://bucket/lists") == ["s3://bucket/lists/d.tif"]


def test_list_file_scenes_with_globs_and_no_duplicates(make_raster, tmp_path):
    for name in ("a.tif", "b.tif", "c.tif"):
        make_raster(name, width=64, height=64)
    listing = tmp_path / "uris.txt"
    listing.write_text("a.tif\n*.tif\n")
    scenes = discover_scenes([ListInput(list=str(listing)), str(tmp_path / "c.tif")])
    assert [Path(s.uri).name for s in scenes] == ["a.tif", "b.tif", "c.tif"]
    assert all(s.stac_item_id is None and s.acquired_at is None for s in scenes)


@pytest.mark.timeout(120)
def test_listed_scenes_are_statted_at_once_not_one_after_another(tmp_path):
    """A list of 32 URLs whose first never answers: every other stat is asked while it hangs.

    One stat after another would send nothing else until the first one's deadline.
    """
    files = {f"/s{index:02d}.tif": b"x" * (100 + index) for index in range(32)}
    server = RangeServer(files)
    server.hang("/s00.tif")
    asked_while_hung: list[int] = []

    def watch() -> None:  # let the hung stat go once every stat has been asked, or at 60 s
        for _ in range(600):
            if len(server.requests) >= len(files):
                break
            threading.Event().wait(0.1)
        asked_while_hung.append(len({path for _, path, _ in server.requests}))
        server.release.set()

    threading.Thread(target=watch, daemon=True).start()
    listing = tmp_path / "uris.txt"
    listing.write_text("".join(f"{server.url}{path}\n" for path in files))
    try:
        scenes = discover_scenes([ListInput(list=str(listing))], timeout_s=90)
    finally:
        server.close()
    assert asked_while_hung == [len(files)]
    assert [s.uri for s in scenes] == [f"{server.url}{path}" for path in files]  # list order
    assert scenes[0].identity.endswith("|unknown")  # the hung one
    assert scenes[5].identity.split("|")[1] == "105"  # the others: their sizes


def test_missing_list_file_is_a_clear_error(tmp_path):
    with pytest.raises(GeoRetinaError, match="input list .*nope.txt"):
        discover_scenes([ListInput(list=str(tmp_path / "nope.txt"))])


# --------------------------------------------------------------------------------------------
# STAC: a static catalog written with pystac
# --------------------------------------------------------------------------------------------

# UTM 33N scenes around 15.0 E, 42.0 N (see pipeline.io.synthetic.write_scene's default origin).
BBOX = [14.99, 41.99, 15.01, 42.01]


def stac_item(item_id, href, when, collection="aerial", bbox=BBOX, asset="visual"):
    item = pystac.Item(
        id=item_id,
        geometry={
            "type": "Polygon",
            "coordinates": [
                [
                    [bbox[0], bbox[1]],
                    [bbox[2], bbox[1]],
                    [bbox[2], bbox[3]],
                    [bbox[0], bbox[3]],
                    [bbox[0], bbox[1]],
                ]
            ],
        },
        bbox=bbox,
        datetime=when,
        properties={},
        collection=collection,
    )
    item.add_asset(asset, pystac.Asset(href=str(href), media_type=pystac.MediaType.COG))
    return item


@pytest.fixture
def catalog(tmp_path, make_raster):
    """A self-contained catalog: two collections, relative asset hrefs, one item without the
    asset the job asks for."""
    root = pystac.Catalog(id="archive", description="test archive")
    aerial = pystac.Collection(
        id="aerial",
        description="aerial",
        extent=pystac.Extent(
            pystac.SpatialExtent([BBOX]), pystac.TemporalExtent([[datetime(2026, 6, 1), None]])
        ),
        license="CC0-1.0",
    )
    other = pystac.Collection(
        id="other", description="other", extent=aerial.extent.clone(), license="CC0-1.0"
    )
    root.add_child(aerial)
    root.add_child(other)
    days = {"early": 1, "mid": 5, "late": 9}
    for name, day in days.items():
        raster = make_raster(f"{name}.tif", width=64, height=64)
        aerial.add_item(stac_item(name, raster, datetime(2026, 6, day, 10, 30, tzinfo=UTC)))
    far = make_raster("far.tif", width=64, height=64)
    aerial.add_item(
        stac_item("far", far, datetime(2026, 6, 5, tzinfo=UTC), bbox=[-70, -10, -69, -9])
    )
    other.add_item(stac_item("other", far, datetime(2026, 6, 5, tzinfo=UTC), collection="other"))
    aerial.add_item(
        stac_item("no-visual", far, datetime(2026, 6, 6, tzinfo=UTC), asset="thumbnail")
    )
    folder = tmp_path / "stac"
    root.normalize_hrefs(str(folder))
    root.make_all_asset_hrefs_relative()
    root.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return folder / "catalog.json"


def search_of(**fields):
    return (
        parse_job({"inputs": [{"stac": {"asset": "visual", **fields}}], "output": OUT})
        .inputs[0]
        .stac
    )


def test_static_catalog_items_become_scenes_with_id_and_time(catalog, tmp_path):
    scenes = stac_scenes(search_of(catalog=str(catalog), collections=["aerial"], bbox=BBOX))
    by_id = {s.stac_item_id: s for s in scenes}
    assert set(by_id) == {"early", "mid", "late", "no-visual"}
    mid = by_id["mid"]
    assert mid.uri == str(tmp_path / "mid.tif")  # the relative href, made absolute
    assert mid.scene_id.startswith("mid-") and mid.problem is None
    assert mid.acquired_at == datetime(2026, 6, 5, 10, 30, tzinfo=UTC)
    assert "has no asset 'visual'" in by_id["no-visual"].problem
    assert "thumbnail" in by_id["no-visual"].problem


def test_static_catalog_filters_like_an_item_search(catalog):
    def ids(**fields):
        return sorted(
            s.stac_item_id for s in stac_scenes(search_of(catalog=str(catalog), **fields))
        )

    assert ids() == ["early", "far", "late", "mid", "no-visual", "other"]
    assert ids(collections=["other"]) == ["other"]
    assert ids(bbox=[-71, -11, -69.5, -9.5]) == ["far"]
    window = "2026-06-04T00:00:00Z/2026-06-05T23:59:59Z"
    assert ids(collections=["aerial"], datetime=window) == ["far", "mid"]
    assert ids(datetime="2026-06-08T00:00:00Z/..") == ["late"]
    assert len(ids(max_items=2)) == 2


def test_unreadable_catalog_is_a_clear_error(tmp_path):
    with pytest.raises(GeoRetinaError, match="STAC catalog .*missing.json"):
        stac_scenes(search_of(catalog=str(tmp_path / "missing.json")))


@pytest.mark.ray
def test_catalog_job_writes_stac_id_and_acquisition_time(ray_session, tmp_path):
    objects = plan_objects(300, 128, 24, count=4, seed=5, max_side=20)
    write_scene(tmp_path / "planted.tif", 300, objects, seed=5, block=128, overviews=False)
    root = pystac.Catalog(id="tiny", description="one scene")
    when = datetime(2026, 6, 3, 9, 15, tzinfo=UTC)
    root.add_item(stac_item("S1_20260603", tmp_path / "planted.tif", when, asset="image"))
    root.add_item(stac_item("broken", tmp_path / "absent.tif", when, asset="image"))
    root.normalize_and_save(str(tmp_path / "stac"), pystac.CatalogType.SELF_CONTAINED)
    job = {
        "inputs": [
            {"stac": {"catalog": str(tmp_path / "stac" / "catalog.json"), "asset": "image"}}
        ],
        "model": {"kind": "threshold"},
        "tiling": {"tile_size": 128, "overlap": 24},
        "output": {"path": str(tmp_path / "out")},
    }
    report = run_job(parse_job(job), progress=lambda _line: None)
    assert report.count("done") == 1 and report.count("failed") == 1
    (failed,) = [s for s in report.scenes if s.status == "failed"]
    assert failed.scene_id.startswith("broken-") and "cannot be read" in failed.error
    (output,) = (tmp_path / "out" / "detections").glob("S1_20260603-*.parquet")
    frame = geopandas.read_parquet(output)
    assert len(frame) == len(objects)
    assert set(frame.stac_item_id) == {"S1_20260603"}
    assert (frame.acquired_at == when).all()
    geo = json.loads(pq.read_schema(output).metadata[b"geo"])
    assert geo["primary_column"] == "geometry"


# --------------------------------------------------------------------------------------------
# STAC: an API item search on loopback
# --------------------------------------------------------------------------------------------


class StacApi(BaseHTTPRequestHandler):
    """Landing page + POST /search with collections, bbox, datetime and paging (next link)."""

    items: list[dict] = []
    requests: list[dict] = []
    page_size = 2

    def log_message(self, *args):
        pass

    def _send(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _root(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    def do_GET(self):
        if self.path.rstrip("/") != "":
            return self._send({"code": "NotFound"}, 404)
        root = self._root()
        self._send(
            {
                "type": "Catalog",
                "id": "loopback",
                "description": "test STAC API",
                "stac_version": "1.0.0",
                "conformsTo": [
                    "https://api.stacspec.org/v1.0.0/core",
                    "https://api.stacspec.org/v1.0.0/item-search",
                ],
                "links": [
                    {"rel": "self", "href": f"{root}/", "type": "application/json"},
                    {"rel": "root", "href": f"{root}/", "type": "application/json"},
                    {
                        "rel": "search",
                        "href": f"{root}/search",
                        "type": "application/geo+json",
                        "method": "POST",
                    },
                ],
            }
        )

    def do_POST(self):
        if self.path != "/search":
            return self._send({"code": "NotFound"}, 404)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        start, end = self._window(body.get("datetime"))
        matched = [
            item
            for item in self.items
            if (not body.get("collections") or item["collection"] in body["collections"])
            and self._bbox_hits(item["bbox"], body.get("bbox"))
            and (start is None or item["properties"]["datetime"] >= start)
            and (end is None or item["properties"]["datetime"] <= end)
        ]
        offset = int(body.get("token", 0))
        page = matched[offset : offset + self.page_size]
        links = []
        if offset + self.page_size < len(matched):
            links.append(
                {
                    "rel": "next",
                    "href": f"{self._root()}/search",
                    "method": "POST",
                    "body": {"token": str(offset + self.page_size)},
                    "merge": True,
                }
            )
        self._send({"type": "FeatureCollection", "features": page, "links": links})

    @staticmethod
    def _window(value):
        if not value:
            return None, None
        first, _, last = value.partition("/")
        last = last or first
        return (None if first == ".." else first), (None if last == ".." else last)

    @staticmethod
    def _bbox_hits(item_bbox, bbox):
        if not bbox:
            return True
        return not (
            item_bbox[0] > bbox[2]
            or item_bbox[2] < bbox[0]
            or item_bbox[1] > bbox[3]
            or item_bbox[3] < bbox[1]
        )


@pytest.fixture
def stac_api(tmp_path, make_raster):
    items = []
    for index in range(5):
        raster = make_raster(f"api{index}.tif", width=64, height=64)
        when = datetime(2026, 6, 1 + index, 12, 0, tzinfo=UTC)
        item = stac_item(f"scene-{index}", raster, when, collection="aerial").to_dict()
        item["properties"]["datetime"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        items.append(item)
    items.append(
        stac_item("elsewhere", tmp_path / "x.tif", datetime(2026, 6, 2, tzinfo=UTC)).to_dict()
        | {"bbox": [-70, -10, -69, -9]}
    )
    handler = type("Handler", (StacApi,), {"items": items, "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_api_search_sends_filters_and_pages(stac_api, tmp_path):
    url, handler = stac_api
    search = search_of(
        api=url + "/",
        collections=["aerial"],
        bbox=BBOX,
        datetime="2026-06-02T00:00:00Z/2026-06-04T23:59:59Z",
    )
    scenes = stac_scenes(search)
    assert [s.stac_item_id for s in scenes] == ["scene-1", "scene-2", "scene-3"]
    assert scenes[0].uri == str(tmp_path / "api1.tif")
    assert scenes[0].acquired_at == datetime(2026, 6, 2, 12, 0, tzinfo=UTC)
    first = handler.requests[0]
    assert first["collections"] == ["aerial"]
    assert first["bbox"] == BBOX
    assert first["datetime"] == "2026-06-02T00:00:00Z/2026-06-04T23:59:59Z"
    assert len(handler.requests) == 2  # two pages of two, the second one holding one item


def test_api_lookback_window_and_max_items(stac_api):
    url, handler = stac_api
    now = datetime(2026, 6, 5, 13, 0, tzinfo=UTC)
    scenes = stac_scenes(search_of(api=url, lookback_days=2.5), now=now)
    assert [s.stac_item_id for s in scenes] == ["scene-2", "scene-3", "scene-4"]
    assert handler.requests[-1]["datetime"] == "2026-06-03T01:00:00Z/2026-06-05T13:00:00Z"
    assert len(stac_scenes(search_of(api=url, max_items=3))) == 3


def test_unreachable_api_is_a_clear_error():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(GeoRetinaError, match=f"STAC API http://127.0.0.1:{port}"):
        stac_scenes(search_of(api=f"http://127.0.0.1:{port}"))
