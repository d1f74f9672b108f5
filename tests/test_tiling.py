import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.enums import Resampling
from servers import RangeServer

from pipeline.errors import SceneError
from pipeline.io.rasters import inspect_raster, open_raster
from pipeline.io.reads import read_tile
from pipeline.ops.tiles import axis_offsets, inner_edges, plan_alignment, plan_tiles, to_uint8


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(1, 3000),
    height=st.integers(1, 3000),
    tile_size=st.integers(32, 700),
    overlap_fraction=st.floats(0.0, 0.49),
    align=st.sampled_from([1, 8, 64, 128]),
)
def test_plan_covers_every_pixel_with_full_aligned_tiles_and_cores_partition(
    width, height, tile_size, overlap_fraction, align
):
    overlap = int(tile_size * overlap_fraction)
    if tile_size - overlap < align:
        with pytest.raises(ValueError, match="largest stride"):
            plan_tiles(width, height, tile_size, overlap, align)
        return
    tiles = plan_tiles(width, height, tile_size, overlap, align)
    covered = np.zeros((height, width), dtype=np.int32)
    cores = np.zeros((height, width), dtype=np.int32)
    for tile in tiles:
        assert (tile.width, tile.height) == (tile_size, tile_size)
        assert tile.col_off % align == 0 and tile.row_off % align == 0
        # Inside the raster, or past its edge only as far as alignment needs (the last tile
        # moved inward to the next multiple of align) or the raster is smaller than a tile.
        for offset, size in ((tile.col_off, width), (tile.row_off, height)):
            assert offset >= 0
            if size >= tile_size:
                assert offset + tile_size - size < align
            else:
                assert offset == 0
        covered[
            tile.row_off : tile.row_off + tile_size, tile.col_off : tile.col_off + tile_size
        ] += 1
        # The core lies inside the tile's window.
        assert tile.col_off <= tile.core_col_off
        assert tile.core_col_off + tile.core_width <= tile.col_off + tile_size
        assert tile.row_off <= tile.core_row_off
        assert tile.core_row_off + tile.core_height <= tile.row_off + tile_size
        cores[
            tile.core_row_off : tile.core_row_off + tile.core_height,
            tile.core_col_off : tile.core_col_off + tile.core_width,
        ] += 1
    assert (covered >= 1).all()
    assert (cores == 1).all()


@given(
    size=st.integers(1, 5000),
    tile=st.integers(32, 600),
    overlap=st.integers(0, 15),
    align=st.sampled_from([1, 16, 64]),
)
def test_neighbours_overlap_at_least_by_overlap(size, tile, overlap, align):
    if tile - overlap < align:
        return
    offsets = axis_offsets(size, tile, overlap, align)
    assert offsets == sorted(set(offsets))
    for left, right in zip(offsets, offsets[1:], strict=False):
        assert left + tile - right >= overlap


def test_tile_count_formula():
    # 3072 px, 512 tiles, 64 overlap: stride 448, ceil(2560 / 448) + 1 = 7 per axis.
    assert len(plan_tiles(3072, 3072, 512, 64)) == 49
    assert axis_offsets(3072, 512, 64)[-1] == 3072 - 512


def test_aligned_plan_moves_the_last_tile_to_a_multiple_of_the_stride():
    # The crops: 1000 px and 1249 x 1035 with 512 px tiles, overlap 64, and the demo
    # model's largest stride 64 (448 is 7 x 64, so only the last offset moves).
    assert axis_offsets(1000, 512, 64) == [0, 448, 488]
    assert axis_offsets(1000, 512, 64, align=64) == [0, 448, 512]  # 512 + 512 > 1000: padded
    assert axis_offsets(1249, 512, 64, align=64) == [0, 448, 768]
    assert axis_offsets(1035, 512, 64, align=64) == [0, 448, 576]
    # ResNet-50 FPN on P3-P7 (stride 128): the step 448 is rounded down to 384.
    assert axis_offsets(1000, 512, 64, align=128) == [0, 384, 512]
    with pytest.raises(ValueError, match="largest stride \\(128\\)"):
        axis_offsets(1000, 160, 48, align=128)


def test_inner_edges():
    assert inner_edges(0, 0, 100, 300, 300) == (False, False, True, True)
    assert inner_edges(200, 100, 100, 300, 300) == (True, True, False, True)


def test_uint16_scaling_and_nan():
    data = np.array([[[0, 500, 1000, np.nan]]], dtype=np.float32)
    assert to_uint8(data, (0.0, 1000.0))[0, 0].tolist() == [0, 127, 255, 0]


def test_read_pads_a_raster_smaller_than_a_tile(make_raster):
    path = make_raster(width=100, height=60)
    tile = plan_tiles(100, 60, 128, 16)[0].window
    with open_raster(str(path)) as dataset:
        image, valid = read_tile(dataset, tile, [1, 2, 3], (0.0, 255.0))
        expected = dataset.read()
    assert image.shape == (3, 128, 128) and image.dtype == np.uint8
    assert (image[:, :60, :100] == expected).all() and not image[:, 60:].any()
    assert valid[:60, :100].all() and not valid[60:].any() and not valid[:, 100:].any()


def test_nodata_is_invalid_and_zeroed(make_raster):
    data = np.full((3, 64, 64), 50, dtype=np.uint16)
    data[:, :, :20] = 0
    path = make_raster(width=64, height=64, dtype="uint16", nodata=0, data=data)
    tile = plan_tiles(64, 64, 64, 0)[0].window
    with open_raster(str(path)) as dataset:
        image, valid = read_tile(dataset, tile, [1, 2, 3], (0.0, 100.0))
    assert not valid[:, :20].any() and valid[:, 20:].all()
    assert (image[:, :, 20:] == 127).all() and (image[:, :, :20] == 0).all()


@pytest.mark.parametrize("internal", [True, False], ids=["internal mask", ".msk sidecar"])
def test_a_dataset_mask_is_honoured_like_nodata(make_raster, internal):
    path = make_raster(width=64, height=64, data=np.full((3, 64, 64), 200, np.uint8))
    mask = np.full((64, 64), 255, np.uint8)
    mask[40:, :] = 0  # e.g. the scene's footprint ends here
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=internal), rasterio.open(path, "r+") as dst:
        dst.write_mask(mask)
    assert path.with_suffix(".tif.msk").exists() != internal
    with open_raster(str(path)) as dataset:
        image, valid = read_tile(
            dataset, plan_tiles(64, 64, 64, 0)[0].window, [1, 2, 3], (0.0, 255.0)
        )
    assert valid[:40].all() and not valid[40:].any()
    assert (image[:, :40] == 200).all() and (image[:, 40:] == 0).all()


def test_inspect_reads_crs_transform_and_percentile_range(make_raster):
    rng = np.random.default_rng(1)
    data = rng.integers(1000, 3000, size=(4, 200, 200)).astype("uint16")
    path = make_raster(width=200, height=200, count=4, dtype="uint16", data=data)
    info = inspect_raster("s1", str(path), [3, 2, 1], None)
    assert info.bands == (3, 2, 1)
    assert 1000 <= info.scale_range[0] < info.scale_range[1] <= 3000
    assert info.crs_name == "EPSG:32633"


def test_percentiles_come_from_an_overview_when_there_is_one(make_raster):
    rng = np.random.default_rng(3)
    path = make_raster(
        width=2048,
        height=2048,
        dtype="uint16",
        data=rng.integers(1000, 1100, size=(3, 2048, 2048)).astype("uint16"),
    )
    with rasterio.open(path, "r+") as dataset:
        dataset.build_overviews([2, 4], Resampling.nearest)
        # Full resolution rewritten, overviews left as they were: which one was read shows.
        dataset.write(rng.integers(5000, 5100, size=(3, 2048, 2048)).astype("uint16"))
    info = inspect_raster("ov", str(path), None, None)
    assert 1000 <= info.scale_range[0] < info.scale_range[1] <= 1100


def test_percentiles_without_overviews_read_a_grid_of_blocks_not_the_whole_raster(make_raster):
    # Served over HTTP, where every byte GDAL decodes is a byte it asked for.
    width, height = 4096, 2048  # 32 x 16 blocks of 128 px, uncompressed: 48 MB
    gradient = np.broadcast_to(np.arange(width, dtype="uint16"), (3, height, width))
    path = make_raster(width=width, height=height, dtype="uint16", data=gradient.copy())
    server = RangeServer({"/scene.tif": path.read_bytes()})
    try:
        info = inspect_raster("big", f"{server.url}/scene.tif", None, None)
    finally:
        server.close()
    size, asked = path.stat().st_size, 0
    for method, _, header in server.requests:
        if method == "GET":  # without a Range header, the whole file
            first, _, last = header.removeprefix("bytes=").partition("-")
            asked += int(last or size - 1) - int(first or 0) + 1
    assert asked < size / 4  # an 8 x 8 grid of the 512 blocks, and the header
    # The gradient's 2-98 % range is 82..4013; the blocks' sample lands near it.
    lo, hi = info.scale_range
    assert abs(lo - 0.02 * width) < 0.05 * width and abs(hi - 0.98 * width) < 0.05 * width


def test_single_band_is_repeated_to_three(make_raster):
    path = make_raster(count=1)
    assert inspect_raster("s1", str(path), None, None).bands == (1, 1, 1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"crs": None}, "no CRS"),
        ({"transform": None}, "no geotransform"),
        ({"count": 2}, "name three in tiling.bands"),
    ],
)
def test_bad_rasters_fail_with_the_scene_named(make_raster, kwargs, message):
    path = make_raster(**kwargs)
    with pytest.raises(SceneError, match=message) as caught:
        inspect_raster("bad-scene", str(path), None, None)
    assert "bad-scene" in str(caught.value)


@pytest.mark.parametrize(
    "kwargs", [{"crs": None}, {"transform": None}], ids=["no CRS", "no transform"]
)
def test_ungeoreferenced_rasters_are_read_in_pixels_only_when_the_job_allows_it(
    make_raster, kwargs
):
    path = make_raster(**kwargs)
    with pytest.raises(SceneError, match="photo.*set tiling.allow_pixel_coordinates"):
        inspect_raster("photo", str(path), None, None)
    info = inspect_raster("photo", str(path), None, None, allow_pixel_coordinates=True)
    assert info.crs_wkt is None and info.crs_name is None and info.bands == (1, 2, 3)


def test_band_out_of_range(make_raster):
    path = make_raster(count=3)
    with pytest.raises(SceneError, match=r"asks for \[4\]"):
        inspect_raster("s", str(path), [4, 3, 2], None)


def test_truncated_file_fails_in_preflight(make_raster, tmp_path):
    path = make_raster(width=512, height=512)
    blob = path.read_bytes()
    broken = tmp_path / "broken.tif"
    broken.write_bytes(blob[: len(blob) // 2])
    with rasterio.open(broken) as dataset:  # the header is whole: opening alone passes
        assert dataset.width == 512
    # The pre-flight's read of the last block is what finds it.
    with pytest.raises(SceneError, match="scene broken: cannot be read as a raster"):
        inspect_raster("broken", str(broken), None, None)


def test_tiles_carry_the_chosen_bands_in_the_chosen_order(make_raster):
    data = np.stack([np.full((64, 64), 10 * (b + 1), np.uint8) for b in range(4)])  # 10..40
    # MINISBLACK: a 4-band RGB GeoTIFF's 4th band would be alpha by GDAL's default.
    path = make_raster(width=64, height=64, count=4, data=data, photometric="MINISBLACK")
    info = inspect_raster("s", str(path), [4, 2, 1], None)
    with open_raster(str(path)) as dataset:
        image, _ = read_tile(
            dataset, plan_tiles(64, 64, 64, 0)[0].window, list(info.bands), info.scale_range
        )
    assert [int(channel.max()) for channel in image] == [40, 20, 10]
    assert [int(channel.min()) for channel in image] == [40, 20, 10]


def test_a_worker_reads_a_scene_through_one_open_dataset(make_raster):
    from pipeline.io.rasters import close_shared_rasters, open_shared_raster

    path = str(make_raster())
    close_shared_rasters()
    with open_shared_raster(path) as first:
        pass
    with open_shared_raster(path) as second:
        assert second is first and not second.closed
    close_shared_rasters()
    assert first.closed


def test_not_a_raster(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("hello")
    with pytest.raises(SceneError, match="cannot be read as a raster"):
        inspect_raster("notes", str(path), None, None)


def test_fsspec_memory_uri_is_read(make_raster):
    import fsspec

    path = make_raster(width=64, height=64)
    with fsspec.open("memory://bucket/scene.tif", "wb") as handle:
        handle.write(path.read_bytes())
    info = inspect_raster("m", "memory://bucket/scene.tif", None, None)
    assert (info.width, info.height) == (64, 64)
    with open_raster("memory://bucket/scene.tif") as dataset, rasterio.open(path) as local:
        assert (dataset.read() == local.read()).all()


def test_palette_image_is_expanded_through_its_colour_map(make_raster):
    data = np.zeros((1, 64, 64), dtype=np.uint8)
    data[0, :, 32:] = 1
    path = make_raster(
        "palette.tif",
        width=64,
        height=64,
        count=1,
        data=data,
        colormap={0: (10, 20, 30, 255), 1: (200, 100, 50, 255)},
        photometric="palette",
    )
    info = inspect_raster("p", str(path), None, None)
    assert info.palette is not None
    with open_raster(str(path)) as dataset:
        image, valid = read_tile(
            dataset,
            plan_tiles(64, 64, 64, 0)[0].window,
            list(info.bands),
            info.scale_range,
            info.palette_table(),
        )
    assert image[:, 0, 0].tolist() == [10, 20, 30]
    assert image[:, 0, 40].tolist() == [200, 100, 50]
    assert valid.all()


def test_alpha_band_is_the_mask_not_a_channel(make_raster):
    data = np.full((4, 64, 64), 100, dtype=np.uint8)
    data[3] = 255
    data[3, :16] = 0  # transparent rows
    path = make_raster(
        "rgba.tif", width=64, height=64, count=4, data=data, photometric="RGB", alpha="YES"
    )
    info = inspect_raster("a", str(path), None, None)
    assert info.bands == (1, 2, 3)
    with open_raster(str(path)) as dataset:
        image, valid = read_tile(
            dataset, plan_tiles(64, 64, 64, 0)[0].window, [1, 2, 3], (0.0, 255.0)
        )
    assert not valid[:16].any() and valid[16:].all()
    assert (image[:, :16] == 0).all() and (image[:, 16:] == 100).all()
    with pytest.raises(SceneError, match="alpha"):
        inspect_raster("a", str(path), [2, 3, 4], None)


def test_gcp_only_raster_is_refused_with_the_fix(tmp_path):
    from rasterio.control import GroundControlPoint

    path = tmp_path / "gcps.tif"
    gcps = [
        GroundControlPoint(0, 0, 500000, 4650000),
        GroundControlPoint(0, 64, 500000, 4649968),
        GroundControlPoint(64, 0, 500032, 4650000),
    ]
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=64,
        height=64,
        count=3,
        dtype="uint8",
        gcps=gcps,
        crs="EPSG:32633",
    ) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    with pytest.raises(SceneError, match="GCPs or RPCs.*gdalwarp"):
        inspect_raster("g", str(path), None, None)


def test_rpc_only_raster_is_refused_with_the_fix(tmp_path):
    from rasterio.rpc import RPC

    path = tmp_path / "rpcs.tif"
    # A plausible RPC00B model (a 64 px image near 42 N, 15 E): only its presence matters.
    rpcs = RPC(
        height_off=100.0, height_scale=500.0, lat_off=42.0, lat_scale=0.01,
        line_den_coeff=[1.0] + [0.0] * 19, line_num_coeff=[0.0, 0.0, -1.0] + [0.0] * 17,
        line_off=32.0, line_scale=32.0, long_off=15.0, long_scale=0.01,
        samp_den_coeff=[1.0] + [0.0] * 19, samp_num_coeff=[0.0, 1.0] + [0.0] * 18,
        samp_off=32.0, samp_scale=32.0,
    )  # fmt: skip
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 3, "dtype": "uint8"}
    with rasterio.open(path, "w", **profile, rpcs=rpcs) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    with rasterio.open(path) as dataset:
        assert dataset.rpcs is not None and dataset.transform.is_identity
    with pytest.raises(SceneError, match="rpc.*GCPs or RPCs.*gdalwarp"):
        inspect_raster("rpc", str(path), None, None)


def test_float32_with_nan_is_invalid_there_and_scaled_by_percentiles(make_raster):
    rng = np.random.default_rng(2)
    data = rng.uniform(0.0, 0.3, size=(3, 128, 128)).astype("float32")
    data[:, :, :40] = np.nan
    path = make_raster(width=128, height=128, dtype="float32", data=data)
    info = inspect_raster("f", str(path), None, None)
    assert 0.0 <= info.scale_range[0] < info.scale_range[1] <= 0.3
    with open_raster(str(path)) as dataset:
        image, valid = read_tile(
            dataset, plan_tiles(128, 128, 128, 0)[0].window, [1, 2, 3], info.scale_range
        )
    assert not valid[:, :40].any() and valid[:, 40:].all()
    assert image[:, :, 40:].max() == 255 and image[:, :, :40].max() == 0


def test_unreachable_uri_fails_quickly_with_the_scene_named():
    with pytest.raises(SceneError, match="far-away.*cannot be read"):
        inspect_raster("far-away", "http://127.0.0.1:9/nothing-here.tif", None, None)


@given(
    blocks=st.integers(2, 40),
    block=st.sampled_from([128, 256, 512]),
    per_tile=st.integers(2, 4),
    overlap_blocks=st.integers(0, 1),
)
def test_windows_fall_on_block_boundaries_when_the_stride_allows(
    blocks, block, per_tile, overlap_blocks
):
    # A tile of k blocks with an overlap of whole blocks: every window but the inward-moved
    # last one starts on a block boundary, so each read decompresses no block it does not use.
    tile, overlap = per_tile * block, overlap_blocks * block
    if overlap >= tile // 2:
        return
    size = blocks * block + 17
    offsets = axis_offsets(size, tile, overlap)
    assert all(offset % block == 0 for offset in offsets[:-1])


def test_alignment_is_the_largest_stride_when_it_fits_else_a_finer_grid_at_no_extra_tiles():
    assert plan_alignment(64, 512, 64) == 64  # the demo model
    assert plan_alignment(128, 512, 64) == 128  # step 448 -> 384: the overlap widens to 128
    assert plan_alignment(1, 512, 64) == 1  # the threshold detector
    # 128 - 16 = 112 = 7 x 16: the P3 and P4 grids stay aligned, the tile count does not grow.
    assert plan_alignment(128, 128, 16) == 16
    assert len(plan_tiles(300, 200, 128, 16, 16)) == len(plan_tiles(300, 200, 128, 16)) == 6
