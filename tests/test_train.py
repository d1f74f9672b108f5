"""Training: focal loss, chips, augmentation, labels, a few real steps, Ray Train; evaluation."""

import math

import geopandas
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import box as shapely_box

from pipeline.config import LabelSource, ModelSettings, OptimSettings, TrainSpec, load_train_spec
from pipeline.errors import JobSpecError
from pipeline.io.labels import LabelError, geometries_to_pixel_boxes, read_labels
from pipeline.io.synthetic import plan_objects, write_labels, write_scene
from pipeline.jobs.train import (
    FocalClassificationHead,
    augment,
    build_trainable_model,
    chip_targets,
    learning_rate,
    make_optimizer,
    raster_sizes,
    read_chips,
    sample_chip_windows,
    save_checkpoint,
    to_batch,
    train_steps,
)
from pipeline.model.build import load_model
from pipeline.model.evaluate import coco_evaluate, components, evaluate_files

TINY_MODEL = {
    "backbone": "resnet18_fpn",
    "fpn_stages": [2, 3],
    "fpn_channels": 32,
    "anchor_sizes": [16, 32, 64, 128],
    "classes": ["object"],
}


# ------------------------------------------------------------------ focal loss


def _head_loss(logit: float, positive: bool, alpha: float = 0.25, gamma: float = 2.0) -> float:
    head = FocalClassificationHead(8, 1, 1, alpha=alpha, gamma=gamma)
    logits = torch.tensor([[[logit]]])  # one image, one anchor, one class
    matched = torch.tensor([0 if positive else -1])  # -1: background anchor
    target = {"labels": torch.tensor([0]), "boxes": torch.zeros(1, 4)}
    return float(head.compute_loss([target], {"cls_logits": logits}, [matched]))


def test_focal_loss_matches_the_formula():
    p = 0.9
    logit = math.log(p / (1 - p))
    # Positive, p_t = 0.9: alpha * (1 - p_t)^gamma * -log(p_t) = 0.25 * 0.01 * 0.105.
    assert _head_loss(logit, True) == pytest.approx(0.25 * 0.01 * -math.log(0.9), rel=1e-4)
    assert _head_loss(logit, True) == pytest.approx(2.634e-4, rel=1e-3)
    # Background anchor scored 0.1: p_t = 0.9, weight 1 - alpha = 0.75.
    assert _head_loss(-logit, False) == pytest.approx(0.75 * 0.01 * -math.log(0.9), rel=1e-4)
    # alpha and gamma are settings: gamma 0, alpha 0.5 is half the cross-entropy.
    assert _head_loss(logit, True, 0.5, 0.0) == pytest.approx(0.5 * -math.log(0.9), rel=1e-4)


def test_classification_prior_is_one_percent():
    spec = _spec("unused.safetensors")
    model, _ = build_trainable_model(spec)
    bias = model.head.classification_head.cls_logits.bias
    assert torch.sigmoid(bias).detach().numpy() == pytest.approx(0.01, rel=1e-4)


# ------------------------------------------------------------------ chips and augmentation


@settings(max_examples=40, deadline=None)
@given(
    x0=st.integers(0, 40),
    y0=st.integers(0, 30),
    w=st.integers(2, 20),
    h=st.integers(2, 20),
    flip_x=st.booleans(),
    flip_y=st.booleans(),
    turns=st.integers(0, 3),
)
def test_augment_moves_boxes_with_the_pixels(x0, y0, w, h, flip_x, flip_y, turns):
    image = np.zeros((3, 64, 64), np.uint8)
    image[:, y0 : y0 + h, x0 : x0 + w] = 255
    boxes = np.array([[x0, y0, x0 + w, y0 + h]], np.float64)
    out, moved = augment(image, boxes, flip_x, flip_y, turns)
    bx0, by0, bx1, by1 = moved[0].astype(int)
    assert out[:, by0:by1, bx0:bx1].min() == 255  # the box covers the object...
    assert out.sum() == image.sum()  # ...and all of it
    assert (bx1 - bx0) * (by1 - by0) == w * h


def test_chip_targets_clip_and_drop_mostly_outside():
    boxes = np.array([[10, 10, 20, 20], [95, 10, 125, 20], [70, 70, 110, 80]], np.float64)
    kept, ids = chip_targets(boxes, np.array([0, 0, 1]), 0, 0, 100, min_visible=0.6)
    # The second box shows 5 of 30 px: dropped; the third 30 of 40 px: kept, clipped.
    assert kept.tolist() == [[10, 10, 20, 20], [70, 70, 100, 80]]
    assert ids.tolist() == [0, 1]


def test_chips_around_labels_contain_them():
    rng = np.random.default_rng(0)
    from pipeline.io.labels import LabelledRaster

    boxes = np.array([[5, 5, 30, 30], [900, 400, 940, 470], [480, 10, 520, 40]], np.float64)
    raster = LabelledRaster("x.tif", boxes, np.zeros(3, np.int64))
    windows = sample_chip_windows([raster], [(1000, 500)], 128, 200, 0.25, rng)
    assert len(windows) == 200
    inside = 0
    for w in windows:
        assert 0 <= w.col_off <= 1000 - 128 and 0 <= w.row_off <= 500 - 128
        inside += any(
            w.col_off <= b[0]
            and b[2] <= w.col_off + 128
            and w.row_off <= b[1]
            and b[3] <= w.row_off + 128
            for b in boxes
        )
    assert inside >= 150  # every label chip (75%) holds a whole label


def test_learning_rate_schedule():
    optim = OptimSettings(learning_rate=0.01, warmup_steps=10, lr_steps=[0.5, 0.75])
    assert learning_rate(0, 100, optim) == pytest.approx(0.001)
    assert learning_rate(10, 100, optim) == pytest.approx(0.01)
    assert learning_rate(50, 100, optim) == pytest.approx(0.001)
    assert learning_rate(99, 100, optim) == pytest.approx(0.0001)


# ------------------------------------------------------------------ labels


def test_geo_labels_in_another_crs_land_on_the_right_pixels(tmp_path):
    objects = plan_objects(512, 256, 32, 10, seed=3)
    transform = write_scene(tmp_path / "s.tif", 512, objects, overviews=False)
    write_labels(tmp_path / "utm.parquet", objects, transform, "EPSG:32633")
    lonlat = geopandas.read_parquet(tmp_path / "utm.parquet").to_crs("EPSG:4326")
    lonlat.to_file(tmp_path / "lonlat.geojson", driver="GeoJSON")
    truth = np.array([(o.x0, o.y0, o.x1, o.y1) for o in objects], np.float64)
    for name in ("utm.parquet", "lonlat.geojson"):
        source = LabelSource(labels=str(tmp_path / name), raster=str(tmp_path / "s.tif"))
        [raster] = read_labels([source], ["object"])
        # Reprojected polygons' bounding boxes grow by far less than a pixel at 0.5 m.
        np.testing.assert_allclose(raster.boxes, truth, atol=0.05)


def test_rotated_transform_pixel_boxes():
    from rasterio.transform import Affine

    transform = Affine.translation(1000, 2000) * Affine.rotation(30) * Affine.scale(2, -2)
    corners = np.array([transform * xy for xy in ((10, 20), (40, 20), (40, 50), (10, 50))])
    np.testing.assert_allclose(
        geometries_to_pixel_boxes([corners], transform)[0], [10, 20, 40, 50], atol=1e-9
    )


def test_pixel_csv_and_bad_labels(tmp_path):
    write_scene(tmp_path / "a.tif", 256, [], overviews=False)
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "image_path,xmin,ymin,xmax,ymax,label\na.tif,10,12,30,40,tree\na.tif,50,50,70,80,tree\n"
    )
    [raster] = read_labels([LabelSource(labels=str(csv))], ["tree"])
    assert raster.uri == f"{tmp_path}/a.tif"
    assert raster.boxes.tolist() == [[10, 12, 30, 40], [50, 50, 70, 80]]
    with pytest.raises(LabelError, match=r"classes \['tree'\] are not in the model's"):
        read_labels([LabelSource(labels=str(csv))], ["ship"])
    no_crs = geopandas.GeoDataFrame(geometry=[shapely_box(0, 0, 1, 1)])
    no_crs.to_parquet(tmp_path / "nocrs.parquet")
    with pytest.raises(LabelError, match="nocrs.parquet: no CRS"):
        read_labels(
            [LabelSource(labels=str(tmp_path / "nocrs.parquet"), raster=str(tmp_path / "a.tif"))],
            ["tree"],
        )
    (tmp_path / "bad.csv").write_text("image_path,xmin,ymin\na.tif,1,2\n")
    with pytest.raises(
        LabelError, match=r"bad.csv: missing column\(s\) \['xmax', 'ymax', 'label'\]"
    ):
        read_labels([LabelSource(labels=str(tmp_path / "bad.csv"))], ["tree"])


# ------------------------------------------------------------------ training


def _training_data(folder, scenes=2, size=768, count=40):
    pairs = []
    for i in range(scenes):
        objects = plan_objects(size, 256, 32, count, seed=50 + i)
        transform = write_scene(folder / f"t{i}.tif", size, objects, seed=50 + i, overviews=False)
        write_labels(folder / f"t{i}.parquet", objects, transform, "EPSG:32633")
        pairs.append({"labels": str(folder / f"t{i}.parquet"), "raster": str(folder / f"t{i}.tif")})
    return pairs


def _spec(output, data=None, **updates) -> TrainSpec:
    body = {
        "model": TINY_MODEL,
        "data": data or [{"labels": "x.csv"}],
        "chips": {"size": 128, "per_epoch": 16},
        "optim": {"epochs": 1, "batch_size": 4, "learning_rate": 0.02, "warmup_steps": 0},
        "output": str(output),
    }
    body.update(updates)
    return TrainSpec.model_validate(body)


def test_a_few_steps_reduce_the_loss(tmp_path):
    torch.manual_seed(0)
    spec = _spec(tmp_path / "m.safetensors", _training_data(tmp_path, scenes=1))
    model, _ = build_trainable_model(spec)
    rasters = read_labels(spec.data, ["object"])
    infos = raster_sizes(rasters, spec)
    rng = np.random.default_rng(0)
    windows = sample_chip_windows(rasters, [(i.width, i.height) for i in infos], 128, 8, 0.0, rng)
    chips = read_chips(rasters, infos, windows, spec)
    assert all(len(c.boxes) for c in chips)
    images, targets = to_batch(chips, np.random.default_rng(1), torch.device("cpu"))

    def loss_on_the_chips() -> float:
        with torch.no_grad():
            return float(sum(model(images, targets).values()))

    before = loss_on_the_chips()
    optimizer = make_optimizer(model, spec.optim)
    for _ in range(20):  # 40 steps over the same 8 chips
        train_steps(model, chips, optimizer, spec, 0, 100, rng, torch.device("cpu"))
    after = loss_on_the_chips()
    assert after < 0.9 * before, (before, after)


def test_fine_tuning_rebuilds_the_head_for_new_classes(tmp_path):
    base = _spec(tmp_path / "base.safetensors")
    model, _ = build_trainable_model(base)
    with torch.no_grad():  # weights no fresh model has
        model.backbone.body.conv1.weight.fill_(0.125)
    save_checkpoint(model, str(tmp_path / "base.safetensors"), "fp32")
    tuned = _spec(
        tmp_path / "t.safetensors",
        model={**TINY_MODEL, "classes": ["ship", "boat"]},
        init_checkpoint=str(tmp_path / "base.safetensors"),
    )
    tuned_model, fresh = build_trainable_model(tuned)
    assert fresh == [
        "head.classification_head.cls_logits.bias",
        "head.classification_head.cls_logits.weight",
    ]
    torch.testing.assert_close(
        tuned_model.backbone.body.conv1.weight, model.backbone.body.conv1.weight
    )


@pytest.mark.ray
def test_georetina_train_through_ray_train_writes_a_loadable_checkpoint(
    ray_session, tmp_path, capsys
):
    from pipeline.cli.main import main

    data = _training_data(tmp_path, scenes=2, size=512, count=20)
    train_file = tmp_path / "train.yaml"
    train_file.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "model": TINY_MODEL,
                "data": [{"labels": d["labels"], "raster": d["raster"]} for d in data],
                "chips": {"size": 128, "per_epoch": 16},
                "optim": {"epochs": 2, "batch_size": 4, "warmup_steps": 2},
                # Two workers: DistributedDataParallel over gloo, each its own share of chips.
                "scaling": {"num_workers": 2, "cpus_per_worker": 1},
                "output": "model/tiny.safetensors",
                "save_dtype": "fp16",
            }
        )
    )
    assert main(["train", str(train_file)]) == 0
    checkpoint = tmp_path / "model" / "tiny.safetensors"
    assert checkpoint.exists()
    import hashlib

    assert (
        f"sha256: {hashlib.sha256(checkpoint.read_bytes()).hexdigest()}" in capsys.readouterr().out
    )
    # The pipeline loads the fp16 file into its fp32 model as it is.
    model, model_id = load_model(
        ModelSettings(**TINY_MODEL, checkpoint=str(checkpoint), name="tiny"), 256
    )
    assert model_id.startswith("tiny:resnet18_fpn:")
    assert next(model.parameters()).dtype == torch.float32


def test_train_spec_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {"data": [{"labels": "a.parquet"}], "output": "m.pt", "optim": {"epochs": 0}}
        )
    )
    with pytest.raises(JobSpecError) as error:
        load_train_spec(bad)
    text = str(error.value)
    assert "data.0: Value error, labels" in text and "name their `raster`" in text
    assert "optim.epochs: Input should be greater than or equal to 1" in text


# ------------------------------------------------------------------ evaluation


def test_components_group_only_intersecting_boxes():
    boxes = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [10, 10, 11, 11], [2.5, 2.5, 4, 4]], float)
    groups = components(boxes)
    assert groups[0] == groups[1] == groups[3] != groups[2]


def test_evaluate_perfect_and_a_constructed_case():
    truth = np.array([[0, 0, 10, 10], [100, 100, 110, 110]], float)
    classes = np.zeros(2, np.int64)
    overall, per_class = coco_evaluate(truth, classes, truth, classes, np.ones(2), ["a"])
    assert (overall.ap, overall.ap50, overall.precision, overall.recall) == (1.0, 1.0, 1.0, 1.0)

    # A hit (0.9), a false positive (0.8), then a hit at IoU 0.6 (0.7): precision 1 up to
    # recall 0.5, then 2/3. COCO's 101-point interpolation: (51 * 1 + 50 * 2/3) / 101.
    # The third box is 10 x 6 inside the 10 x 10 label: IoU 0.6.
    found = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [100, 100, 110, 106]], float)
    overall, _ = coco_evaluate(
        truth, classes, found, np.zeros(3, np.int64), np.array([0.9, 0.8, 0.7]), ["a"], 0.5, 0.75
    )
    assert overall.ap50 == pytest.approx((51 + 50 * 2 / 3) / 101)
    assert (overall.precision, overall.recall) == (0.5, 0.5)  # score >= 0.75: one hit, one miss
    # At IoU 0.75 the third box misses: recall stops at 0.5, with precision 1 up to there.
    assert overall.ap75 == pytest.approx(51 / 101)


def test_evaluate_files_matches_in_crs_coordinates(tmp_path):
    boxes = [
        shapely_box(500_000 + 10 * i, 4_600_000, 500_005 + 10 * i, 4_600_004) for i in range(5)
    ]
    labels = geopandas.GeoDataFrame({"label": ["car"] * 5}, geometry=boxes, crs="EPSG:32633")
    labels.to_crs("EPSG:4326").to_file(tmp_path / "labels.geojson", driver="GeoJSON")
    found = geopandas.GeoDataFrame(
        {"class_name": ["car"] * 4, "score": [0.9, 0.8, 0.7, 0.6]},
        geometry=boxes[:4],
        crs="EPSG:32633",
    ).to_crs("OGC:CRS84")
    found.to_parquet(tmp_path / "detections.parquet")
    result = evaluate_files(str(tmp_path / "detections.parquet"), str(tmp_path / "labels.geojson"))
    assert result.overall.precision == 1.0 and result.overall.recall == 0.8
    assert result.per_class["car"].labels == 5
    assert "EPSG:32633" in result.crs
