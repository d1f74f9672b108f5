"""RetinaNet construction, checkpoints, and the batched detector path (no Ray)."""

import hashlib

import numpy as np
import pytest
import torch

from pipeline.config import ModelSettings
from pipeline.errors import CheckpointError
from pipeline.model.build import build_model, largest_stride, load_model
from pipeline.model.detector import RetinaNetDetector, ThresholdDetector, detect_tiles

TILE = 128


def settings(**kwargs) -> ModelSettings:
    # Low threshold: an untrained head scores ~0.01, and the test needs boxes to compare.
    base = {
        "backbone": "resnet18_fpn",
        "classes": ["ship", "boat"],
        "score_threshold": 0.001,
        "detections_per_tile": 50,
    }
    return ModelSettings(**{**base, **kwargs})


@pytest.fixture
def unquantised(monkeypatch):
    """Decisions on scores as fine as float32 holds them, as torchvision's own: an untrained
    head scores thousands of candidates within 1e-5 of each other, which the shipped
    SCORE_STEP orders by place instead (tested apart, with a planted near-tie)."""
    monkeypatch.setattr("pipeline.model.postprocess.SCORE_STEP", 2.0**-30)


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(3, 3, TILE, TILE), dtype=np.uint8)


def test_model_does_not_resize_tiles(tiles):
    model = build_model(settings(), TILE)
    x = torch.from_numpy(tiles).float() / 255
    images, _ = model.transform(list(x))
    assert images.tensors.shape[-2:] == (TILE, TILE)
    assert model.head.classification_head.num_classes == 2


@pytest.mark.parametrize(
    ("backbone", "stages", "anchors", "stride"),
    [
        ("resnet18_fpn", [2, 3], [16, 32, 64, 128], 64),  # the demo model
        ("resnet18_fpn", [2, 3, 4], [32, 64, 128, 256, 512], 128),
        ("resnet50_fpn", [2, 3, 4], [32, 64, 128, 256, 512], 128),  # P3-P7
    ],
)
def test_largest_stride_is_the_coarsest_feature_maps_stride(backbone, stages, anchors, stride):
    """Derived from the settings, checked against the network's own feature maps; tiles of
    any size are padded to a multiple of it, so anchors are laid at the true stride."""
    config = settings(backbone=backbone, fpn_stages=stages, anchor_sizes=anchors)
    assert largest_stride(config) == stride
    assert largest_stride(settings(kind="threshold")) == 1
    model = build_model(config, 200)
    with torch.inference_mode():
        images, _ = model.transform([torch.rand(3, 200, 200)])
        features = list(model.backbone(images.tensors).values())
        anchors_out = model.anchor_generator(images, features)[0]
    side = images.tensors.shape[-1]
    assert side % stride == 0 and side >= 200
    assert side // features[-1].shape[-1] == stride
    # The coarsest level's anchors step by the stride (its centres lie on that grid).
    last = anchors_out[-(features[-1].shape[-1] ** 2) * 9 :]
    centres = torch.unique((last[:, 0] + last[:, 2]) / 2)
    assert torch.allclose(torch.diff(centres), torch.tensor(float(stride)))


def test_invalid_pixels_are_the_normalisations_mean_whatever_the_read_put_there(tiles):
    """Past the raster's edge (or on nodata) the model sees the normalisation's mean, as in
    torchvision's batch padding and the network's zero padding, never the pixels' values."""
    config = settings(fpn_stages=[2, 3], anchor_sizes=[16, 32, 64, 128])  # stride 64
    detector = RetinaNetDetector(config, TILE, device="cpu", torch_threads=2)
    valid = np.zeros((1, TILE, TILE), np.uint8)
    valid[0, :64, :100] = 1  # the raster ends inside this tile
    black, noise = tiles[:1].copy(), tiles[:1].copy()
    black[0][:, valid[0] == 0] = 0  # what a read gives past the edge
    mean = np.round(255 * np.array(detector.model.transform.image_mean)).astype(np.uint8)
    grey = black.copy()
    grey[0][:, valid[0] == 0] = mean[:, None]
    (as_noise,) = detector(noise, valid)
    (as_black,) = detector(black, valid)
    (unmasked_grey,) = detector(grey)
    (unmasked_black,) = detector(black)
    assert len(as_noise.boxes) > 0
    np.testing.assert_array_equal(as_noise.boxes, as_black.boxes)
    np.testing.assert_array_equal(as_noise.scores, as_black.scores)
    # Grey in uint8 is the mean to within rounding: far nearer what the mask gives than black.
    near = np.abs(unmasked_grey.scores[:5] - as_black.scores[:5]).max()
    far = np.abs(unmasked_black.scores[:5] - as_black.scores[:5]).max()
    assert near < far / 10


def test_batched_detector_equals_a_per_tile_model_loop(tiles, unquantised):
    detector = RetinaNetDetector(settings(), TILE, device="cpu", torch_threads=2)
    batched = detector(tiles)
    model = build_model(settings(), TILE)
    assert len(batched) == len(tiles)
    for image, found in zip(tiles, batched, strict=False):
        x = torch.from_numpy(image).float() / 255
        with torch.inference_mode():
            (expected,) = model([x])
        assert found.boxes.dtype == np.float32 and found.boxes.shape[1] == 4
        assert found.scores.dtype == np.float32 and found.class_ids.dtype == np.int16
        assert len(found.boxes) == len(expected["boxes"]) > 0
        np.testing.assert_allclose(found.boxes, expected["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(found.scores, expected["scores"].numpy(), atol=1e-5)
        assert (found.class_ids == expected["labels"].numpy()).all()


def test_all_nodata_tiles_never_reach_the_detector(tiles):
    calls = []

    class Recorder:
        model_id = "recorder"

        def __call__(self, images, valid=None):
            calls.append(len(images))
            return ThresholdDetector(settings(kind="threshold"))(images)

    valid = np.ones((len(tiles), TILE, TILE), np.uint8)
    valid[1] = 0
    found = detect_tiles(Recorder(), tiles, valid, np.array([True, True, False]), 0.5)
    assert calls == [1]  # tile 1 is nodata, tile 2 failed to read
    assert len(found) == 3


def test_boxes_mostly_on_nodata_are_dropped():
    image = np.zeros((1, 3, 64, 64), np.uint8)
    image[0, :, 10:20, 10:20] = 255  # on valid pixels
    image[0, :, 40:50, 40:50] = 255  # on nodata
    valid = np.ones((1, 64, 64), np.uint8)
    valid[0, 32:, 32:] = 0
    detector = ThresholdDetector(settings(kind="threshold", threshold_min_pixels=4))
    (found,) = detect_tiles(detector, image, valid, np.array([True]), 0.5)
    assert found.boxes.tolist() == [[10, 10, 20, 20]]


def test_checkpoint_round_trip_with_sha256(tmp_path, tiles):
    model = build_model(settings(), TILE)
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.fill_(0.5)
    path = tmp_path / "model.pt"
    torch.save({"model": model.state_dict()}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded, model_id = load_model(settings(checkpoint=str(path), checkpoint_sha256=digest), TILE)
    assert model_id.endswith(digest[:12])
    assert torch.equal(
        loaded.head.classification_head.cls_logits.bias,
        model.head.classification_head.cls_logits.bias,
    )


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = build_model(settings(), TILE)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    load_model(settings(checkpoint=str(path)), TILE)


def test_wrong_sha256_fails(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_model(settings(), TILE).state_dict(), path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_model(settings(checkpoint=str(path), checkpoint_sha256="0" * 64), TILE)


def test_checkpoint_with_other_classes_names_the_shapes(tmp_path):
    path = tmp_path / "three_classes.pt"
    torch.save(build_model(settings(classes=["a", "b", "c"]), TILE).state_dict(), path)
    with pytest.raises(CheckpointError, match="shapes differ.*cls_logits"):
        load_model(settings(checkpoint=str(path)), TILE)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a loadable state dict"):
        load_model(settings(checkpoint=str(path)), TILE)


def test_corrupt_checkpoint(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_model(settings(checkpoint=str(path)), TILE)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_model(settings(checkpoint=str(tmp_path / "nope.pt")), TILE)


def test_torchvision_and_deepforest_style_checkpoints_load(tmp_path):
    """torchvision's own retinanet_resnet50_fpn state dict loads into our resnet50_fpn, and so
    does the same model saved by a LightningModule (DeepForest's checkpoints: keys under
    'model.', metric buffers beside them, hyper-parameters)."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    reference = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=1)
    state = reference.state_dict()
    plain = tmp_path / "torchvision.pt"
    torch.save(state, plain)
    tree = {"backbone": "resnet50_fpn", "classes": ["Tree"]}
    loaded, _ = load_model(ModelSettings(**tree, checkpoint=str(plain)), 400)
    assert torch.equal(
        loaded.head.classification_head.cls_logits.weight,
        state["head.classification_head.cls_logits.weight"],
    )

    lightning = tmp_path / "deepforest.ckpt"
    torch.save(
        {
            "epoch": 3,
            "state_dict": {
                **{f"model.{k}": v for k, v in state.items()},
                "iou_metric.total": torch.zeros(1),
            },
            "hyper_parameters": {"config": {"num_classes": 1, "label_dict": {"Tree": 0}}},
        },
        lightning,
    )
    loaded, model_id = load_model(ModelSettings(**tree, checkpoint=str(lightning)), 400)
    assert torch.equal(loaded.backbone.body.conv1.weight, state["backbone.body.conv1.weight"])
    assert model_id.startswith("retinanet:resnet50_fpn:")


def test_a_mismatched_checkpoint_fails_the_job_before_any_tile_is_read(tmp_path, make_raster):
    from pipeline.config import parse_job
    from pipeline.jobs.run import run_job

    path = tmp_path / "three_classes.pt"
    torch.save(build_model(settings(classes=["a", "b", "c"]), TILE).state_dict(), path)
    spec = parse_job(
        {
            "inputs": [str(make_raster())],
            "model": {
                "backbone": "resnet18_fpn",
                "classes": ["ship", "boat"],
                "checkpoint": str(path),
            },
            "tiling": {"tile_size": TILE, "overlap": 16},
            "output": {"path": str(tmp_path / "out")},
        }
    )
    with pytest.raises(CheckpointError, match="shapes differ.*cls_logits"):
        run_job(spec, progress=lambda line: None)
    assert not (tmp_path / "out" / "detections").exists()


def _canonical(found: dict[str, torch.Tensor]) -> list[tuple]:
    """Rows sorted by score, then label and box: tied scores may come in either order."""
    rows = zip(
        found["scores"].tolist(),
        found["labels"].tolist(),
        [tuple(round(v, 3) for v in box) for box in found["boxes"].tolist()],
        strict=True,
    )
    return sorted(rows, key=lambda row: (-row[0], row[1], row[2]))


@pytest.mark.parametrize(
    "knobs",
    [
        {"score_threshold": 0.0, "classes": ["a", "b", "c"], "detections_per_tile": 1000},
        {"score_threshold": 0.0105, "topk_candidates": 40, "detections_per_tile": 1000},
        {"score_threshold": 0.0, "nms_threshold": 0.3, "detections_per_tile": 25},
    ],
)
@pytest.mark.parametrize("one_nms_call", [True, False], ids=["one-nms-call", "nms-per-image"])
def test_batched_postprocess_returns_torchvisions_boxes(knobs, one_nms_call, unquantised):
    from pipeline.model.postprocess import retinanet_detect

    torch.manual_seed(1)
    model = build_model(settings(**knobs), TILE)
    # Scores spread over (0, 1), as a trained head's are: an untrained one puts thousands
    # within float32's spacing of 0.0105, exact ties that the two sides break differently.
    torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.05)
    x = torch.rand(4, 3, TILE, TILE)
    with torch.inference_mode():
        expected = model(list(x))
        ours = retinanet_detect(model, x, one_nms_call)
    assert len(ours) == len(expected) == 4
    for mine, theirs in zip(ours, expected, strict=True):
        assert len(theirs["boxes"]) > 0
        assert _canonical(mine) == _canonical(theirs)


cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU and none is visible here; on a GPU machine: bash bench/gpu_check.sh",
)


@cuda
def test_detector_on_cuda_equals_a_per_tile_model_loop_there(tiles, unquantised):
    """The GPU path (pinned uint8, channels-last, batched postprocessing) in fp32 gives the
    boxes torchvision's own per-tile call gives on the same device."""
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions on both sides
    try:
        batched = RetinaNetDetector(settings(), TILE, device="cuda", precision="fp32")(tiles)
        model = build_model(settings(), TILE).cuda()
        for image, found in zip(tiles, batched, strict=True):
            with torch.inference_mode():
                (expected,) = model([torch.from_numpy(image).cuda().float() / 255])
            assert len(found.boxes) == len(expected["boxes"]) > 0
            np.testing.assert_allclose(found.boxes, expected["boxes"].cpu().numpy(), atol=1e-2)
            np.testing.assert_allclose(found.scores, expected["scores"].cpu().numpy(), atol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = True


@cuda
def test_detector_on_cuda_in_bf16_returns_float32_boxes_inside_the_tile(tiles):
    found = RetinaNetDetector(settings(), TILE, device="cuda", precision="bf16")(tiles)
    assert len(found) == len(tiles) and all(len(f.boxes) for f in found)
    for tile in found:
        assert tile.boxes.dtype == np.float32 and tile.scores.dtype == np.float32
        assert tile.boxes.min() >= 0 and tile.boxes.max() <= TILE
