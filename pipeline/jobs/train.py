"""``georetina train``: RetinaNet with focal loss on the user's classes, through Ray Train.

Pure parts (chip sampling, box clipping, flips and rotations, the learning-rate schedule,
the focal loss) are plain functions; the Ray layer is :func:`train_loop_per_worker` and
:func:`run_training`. Chips are read exactly as the pipeline reads tiles (same bands, same
scaling to uint8), so a model sees in training what it will see in a job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.retinanet import RetinaNetClassificationHead
from torchvision.ops import sigmoid_focal_loss

from pipeline.config import OptimSettings, TrainSpec
from pipeline.errors import GeoRetinaError
from pipeline.io.labels import LabelledRaster, read_labels

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Chips (pure)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChipWindow:
    raster: int  # index into the list of labelled rasters
    col_off: int
    row_off: int


def _offset_around(lo: float, hi: float, size: int, extent: int, rng: np.random.Generator) -> int:
    """A chip offset along one axis that contains ``[lo, hi)`` (centred if it cannot)."""
    if extent <= size:
        return 0
    first = math.ceil(hi) - size  # smallest offset that still contains the box's far edge
    last = math.floor(lo)
    if first > last:  # the object is larger than a chip: centre on it
        first = last = int((lo + hi) / 2 - size / 2)
    first, last = max(0, first), min(extent - size, last)
    return (
        int(rng.integers(first, last + 1)) if last >= first else max(0, min(first, extent - size))
    )


def sample_chip_windows(
    rasters: list[LabelledRaster],
    sizes: list[tuple[int, int]],
    size: int,
    count: int,
    background_fraction: float,
    rng: np.random.Generator,
) -> list[ChipWindow]:
    """Chips around randomly chosen labels, and a share from anywhere (the background).

    ``sizes`` holds each raster's ``(width, height)``. A label is picked uniformly over all
    labels, so rasters with more labels give more chips; background chips are spread by area.
    """
    label_index = [(r, i) for r, raster in enumerate(rasters) for i in range(len(raster.boxes))]
    n_background = round(count * background_fraction) if label_index else count
    windows = []
    for _ in range(count - n_background):
        r, i = label_index[int(rng.integers(len(label_index)))]
        x0, y0, x1, y1 = rasters[r].boxes[i]
        width, height = sizes[r]
        windows.append(
            ChipWindow(
                r,
                _offset_around(x0, x1, size, width, rng),
                _offset_around(y0, y1, size, height, rng),
            )
        )
    areas = np.array([w * h for w, h in sizes], dtype=np.float64)
    for r in rng.choice(len(sizes), size=n_background, p=areas / areas.sum()):
        width, height = sizes[r]
        windows.append(
            ChipWindow(
                int(r),
                int(rng.integers(0, max(0, width - size) + 1)),
                int(rng.integers(0, max(0, height - size) + 1)),
            )
        )
    return windows


def chip_targets(
    boxes: np.ndarray,
    class_ids: np.ndarray,
    col_off: int,
    row_off: int,
    size: int,
    min_visible: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The boxes inside a chip, in chip pixels, clipped to it; those mostly outside drop."""
    shifted = boxes - np.array([col_off, row_off, col_off, row_off], dtype=np.float64)
    clipped = np.clip(shifted, 0, size)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (visible > 0) & (visible >= min_visible * area)
    return clipped[keep].astype(np.float32), class_ids[keep]


def augment(
    image: np.ndarray, boxes: np.ndarray, flip_x: bool, flip_y: bool, quarter_turns: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flips and 90° turns of a ``C×H×W`` image and its boxes (overhead: no true up)."""
    height, width = image.shape[1:]
    boxes = boxes.copy()
    if flip_x:
        image = image[:, :, ::-1]
        boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    if flip_y:
        image = image[:, ::-1]
        boxes[:, [1, 3]] = height - boxes[:, [3, 1]]
    for _ in range(quarter_turns % 4):
        # np.rot90 turns counter-clockwise: the point (x, y) goes to (y, width - x).
        image = np.rot90(image, axes=(1, 2))
        boxes = np.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], 1)
        height, width = width, height
    return np.ascontiguousarray(image), boxes


def learning_rate(step: int, total_steps: int, optim: OptimSettings) -> float:
    """Linear warm-up from lr/10, then a step decay at each fraction in ``lr_steps``."""
    lr = optim.learning_rate * optim.lr_gamma ** sum(
        step >= fraction * total_steps for fraction in optim.lr_steps
    )
    if step < optim.warmup_steps:
        lr *= 0.1 + 0.9 * step / optim.warmup_steps
    return lr


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class FocalClassificationHead(RetinaNetClassificationHead):
    """torchvision's classification head with focal loss alpha and gamma as settings.

    torchvision fixes alpha 0.25 and gamma 2; the loss is otherwise the same: summed over
    anchors that are not between IoU thresholds, divided by the number of positives.
    """

    def __init__(self, *args: Any, alpha: float = 0.25, gamma: float = 2.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.alpha, self.gamma = alpha, gamma

    def compute_loss(
        self,
        targets: list[dict[str, torch.Tensor]],
        head_outputs: dict[str, torch.Tensor],
        matched_idxs: list[torch.Tensor],
    ) -> torch.Tensor:
        losses = []
        for target, logits, matched in zip(
            targets, head_outputs["cls_logits"], matched_idxs, strict=True
        ):
            foreground = matched >= 0
            wanted = torch.zeros_like(logits)
            wanted[foreground, target["labels"][matched[foreground]]] = 1.0
            counted = matched != self.BETWEEN_THRESHOLDS
            loss = sigmoid_focal_loss(
                logits[counted], wanted[counted], self.alpha, self.gamma, reduction="sum"
            )
            losses.append(loss / max(1, int(foreground.sum())))
        return torch.stack(losses).sum() / len(targets)


def _init_weights(model: RetinaNet, checkpoint: str | None) -> list[str]:
    """Start from ``checkpoint`` when given (fine-tuning).

    Keys whose shapes differ (another class list: the classification logits) keep their fresh
    initialisation: the head is rebuilt for the new classes. Returns those keys.
    """
    from pipeline.model.build import parse_state_dict, read_checkpoint_bytes

    if checkpoint is None:
        return []
    blob, _ = read_checkpoint_bytes(checkpoint, None)
    state = parse_state_dict(blob, checkpoint)
    own = model.state_dict()
    fresh = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in fresh}, False)
    return fresh


def build_trainable_model(spec: TrainSpec) -> tuple[RetinaNet, list[str]]:
    """The job's RetinaNet (same builder as inference) in train mode, with the focal head."""
    from pipeline.model.build import build_model

    model = build_model(spec.model.model_copy(update={"checkpoint": None}), spec.chips.size)
    old = model.head.classification_head
    head = FocalClassificationHead(
        old.conv[0][0].in_channels,
        old.num_anchors,
        old.num_classes,
        norm_layer=None if spec.model.backbone != "resnet50_fpn_v2" else type(old.conv[0][1]),
        alpha=spec.optim.focal_alpha,
        gamma=spec.optim.focal_gamma,
    )
    head.load_state_dict(old.state_dict())  # keeps the 0.01 prior on the logits' bias
    model.head.classification_head = head
    fresh = _init_weights(model, spec.init_checkpoint)
    return model.train(), fresh


# --------------------------------------------------------------------------------------------
# Reading chips
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chip:
    image: np.ndarray  # 3×H×W uint8
    boxes: np.ndarray  # (k, 4) float32 chip pixels
    class_ids: np.ndarray  # (k,) int64


def raster_sizes(rasters: list[LabelledRaster], spec: TrainSpec) -> list[Any]:
    """Each raster's pre-flight info (bands, scaling, size): as a job would read it."""
    from pipeline.io.rasters import inspect_raster

    return [inspect_raster(r.uri, r.uri, spec.bands, spec.scale_range) for r in rasters]


def read_chips(
    rasters: list[LabelledRaster], infos: list[Any], windows: list[ChipWindow], spec: TrainSpec
) -> list[Chip]:
    """Read chips with the pipeline's tile reader, one open dataset per raster."""
    from rasterio.windows import Window

    from pipeline.io.rasters import open_raster
    from pipeline.io.reads import read_tile

    size = spec.chips.size
    chips = []
    for r in sorted({w.raster for w in windows}):
        info = infos[r]
        palette = np.array(info.palette, np.uint8).reshape(256, 3) if info.palette else None
        with open_raster(rasters[r].uri) as dataset:
            for w in (w for w in windows if w.raster == r):
                image, _ = read_tile(
                    dataset,
                    Window(w.col_off, w.row_off, size, size),
                    list(info.bands),
                    info.scale_range,
                    palette,
                )
                boxes, ids = chip_targets(
                    rasters[r].boxes,
                    rasters[r].class_ids,
                    w.col_off,
                    w.row_off,
                    size,
                    spec.chips.min_visible,
                )
                chips.append(Chip(image, boxes, ids))
    return chips


# --------------------------------------------------------------------------------------------
# Training steps (no Ray: tests call this directly)
# --------------------------------------------------------------------------------------------


def to_batch(
    chips: list[Chip], rng: np.random.Generator, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Augmented chips as the float images and targets torchvision's RetinaNet takes."""
    images, targets = [], []
    for chip in chips:
        flips = rng.integers(0, 2, size=2)
        image, boxes = augment(
            chip.image, chip.boxes, bool(flips[0]), bool(flips[1]), int(rng.integers(0, 4))
        )
        tensor = torch.from_numpy(image).to(device).float().div_(255.0)
        images.append(tensor)
        targets.append(
            {
                "boxes": torch.from_numpy(boxes.astype(np.float32)).to(device).reshape(-1, 4),
                "labels": torch.from_numpy(chip.class_ids).to(device),
            }
        )
    return images, targets


def train_steps(
    model: torch.nn.Module,
    chips: list[Chip],
    optimizer: torch.optim.Optimizer,
    spec: TrainSpec,
    first_step: int,
    total_steps: int,
    rng: np.random.Generator,
    device: torch.device,
) -> list[dict[str, float]]:
    """One pass over ``chips`` in batches; returns each step's losses and learning rate."""
    order = rng.permutation(len(chips))
    batch_size = spec.optim.batch_size
    history = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        step = first_step + len(history)
        lr = learning_rate(step, total_steps, spec.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = to_batch(
            [chips[i] for i in order[start : start + batch_size]], rng, device
        )
        losses = model(images, targets)
        loss = losses["classification"] + losses["bbox_regression"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if spec.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip)
        optimizer.step()
        history.append(
            {
                "loss": float(loss.detach()),
                "classification": float(losses["classification"].detach()),
                "bbox_regression": float(losses["bbox_regression"].detach()),
                "lr": lr,
            }
        )
    return history


def make_optimizer(model: torch.nn.Module, optim: OptimSettings) -> torch.optim.Optimizer:
    # No weight decay on norm layers and biases, as detectron2 and torchvision's recipes do.
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=optim.learning_rate)
    return torch.optim.SGD(groups, lr=optim.learning_rate, momentum=optim.momentum)


def save_checkpoint(model: torch.nn.Module, uri: str, dtype: str) -> str:
    """Write the state dict as safetensors (path or fsspec URI); returns its sha256."""
    import hashlib

    import fsspec
    from safetensors.torch import save

    state = {
        key: (value.half() if dtype == "fp16" and value.is_floating_point() else value)
        .detach()
        .cpu()
        .contiguous()
        for key, value in model.state_dict().items()
    }
    blob = save(state, metadata={"format": "pt", "producer": "georetina train"})
    with fsspec.open(uri, "wb", auto_mkdir=True) as handle:
        handle.write(blob)
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------------------------
# Ray Train
# --------------------------------------------------------------------------------------------


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its share of each epoch's chips; rank 0 writes the checkpoint."""
    import ray.train
    import ray.train.torch

    spec = TrainSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(spec.scaling.cpus_per_worker)))
    torch.manual_seed(spec.seed + rank)
    model, fresh = build_trainable_model(spec)
    if fresh and rank == 0 and spec.init_checkpoint:
        print(f"fine-tuning: {len(fresh)} tensor(s) start fresh, e.g. {fresh[:2]}", flush=True)
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, spec.optim)

    rasters = read_labels(spec.data, spec.model.classes)
    infos = raster_sizes(rasters, spec)
    sizes = [(info.width, info.height) for info in infos]
    per_worker = math.ceil(spec.chips.per_epoch / world)
    steps_per_epoch = per_worker // spec.optim.batch_size
    total_steps = steps_per_epoch * spec.optim.epochs
    step = 0
    epochs: list[dict[str, float]] = []
    for epoch in range(spec.optim.epochs):
        started = time.perf_counter()
        rng = np.random.default_rng([spec.seed, epoch, rank])
        windows = sample_chip_windows(
            rasters, sizes, spec.chips.size, per_worker, spec.chips.background_fraction, rng
        )
        chips = read_chips(rasters, infos, windows, spec)
        history = train_steps(model, chips, optimizer, spec, step, total_steps, rng, device)
        step += len(history)
        metrics = {
            "epoch": epoch + 1,
            "steps": step,
            "loss": float(np.mean([h["loss"] for h in history])),
            "classification": float(np.mean([h["classification"] for h in history])),
            "bbox_regression": float(np.mean([h["bbox_regression"] for h in history])),
            "lr": history[-1]["lr"],
            "chips_per_s": len(history) * spec.optim.batch_size / (time.perf_counter() - started),
        }
        epochs.append(metrics)
        if rank == 0:
            # The worker's log keeps every epoch; the driver prints it from the queue.
            print("train: " + json.dumps({k: round(v, 5) for k, v in metrics.items()}), flush=True)
            if config.get("epochs_queue") is not None:
                config["epochs_queue"].put(metrics)
        ray.train.report(metrics)
    if rank == 0:
        unwrapped = model.module if hasattr(model, "module") else model
        digest = save_checkpoint(unwrapped, spec.output, spec.save_dtype)
        write_training_record(spec, digest, epochs, training_resolution(infos))
        print(f"train: wrote {spec.output} (sha256 {digest})", flush=True)


def training_record_uri(checkpoint: str) -> str:
    return checkpoint.removesuffix(".safetensors") + ".train.json"


def training_resolution(infos: list[Any]) -> float | None:
    """The training rasters' ground sample distance (m/px, the median over rasters): what a
    job's ``model.resolution_m`` should say. None when none is georeferenced."""
    from pipeline.io.rasters import ground_pixel_size

    sizes = [
        np.mean(ground_pixel_size(info.crs_wkt, info.transform, info.width, info.height))
        for info in infos
        if info.crs_wkt is not None
    ]
    return round(float(np.median(sizes)), 4) if sizes else None


def write_training_record(
    spec: TrainSpec,
    digest: str,
    epochs: list[dict[str, float]],
    resolution_m: float | None = None,
) -> None:
    """Beside the checkpoint: its sha256, the settings that made it, the loss per epoch and
    the training data's resolution (``resolution_m``, for the job's model settings)."""
    import fsspec

    record = {
        "sha256": digest,
        "spec": spec.model_dump(mode="json"),
        "epochs": epochs,
        "resolution_m": resolution_m,
    }
    with fsspec.open(training_record_uri(spec.output), "w", auto_mkdir=True) as handle:
        handle.write(json.dumps(record, indent=2))


@dataclass(frozen=True)
class TrainReport:
    output: str
    sha256: str
    epochs: int
    final_loss: float
    first_loss: float
    wall_s: float


def epoch_line(metrics: dict[str, float], spec: TrainSpec) -> str:
    """``epoch 3/12: loss 0.4321 (classification 0.3012, box 0.1309), lr 0.01, 28.1 chips/s``."""
    return (
        f"epoch {int(metrics['epoch'])}/{spec.optim.epochs}: loss {metrics['loss']:.4f} "
        f"(classification {metrics['classification']:.4f}, "
        f"box {metrics['bbox_regression']:.4f}), lr {metrics['lr']:.4g}, "
        f"{metrics['chips_per_s']:.1f} chips/s"
    )


def run_training(
    spec: TrainSpec,
    address: str | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    show_worker_logs: bool = False,
) -> TrainReport:
    """Train on Ray (embedded or ``address``) with ``spec.scaling`` workers.

    ``on_epoch`` gets each epoch's metrics on the driver as the epoch ends (from rank 0,
    through a Ray queue); the workers' own output stays in their logs unless
    ``show_worker_logs``.
    """
    import tempfile

    import fsspec
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from pipeline.jobs.ray_session import ensure_ray

    rasters = read_labels(spec.data, spec.model.classes)  # fail on bad labels before Ray work
    if sum(len(r.boxes) for r in rasters) == 0:
        from pipeline.io.labels import LabelError

        raise LabelError(f"training {spec.name}: the label files hold no boxes")
    _check_can_start(spec)
    started = time.perf_counter()
    ensure_ray(address, log_to_driver=show_worker_logs)
    epochs_queue = Queue() if on_epoch is not None else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.model_dump(), "epochs_queue": epochs_queue},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker={"CPU": spec.scaling.cpus_per_worker}
            | ({"GPU": 1} if spec.scaling.use_gpu else {}),
        ),
        run_config=RunConfig(
            name=f"{spec.name}-{int(time.time())}", storage_path=tempfile.gettempdir()
        ),
    )
    with _relayed(epochs_queue, on_epoch):
        result = trainer.fit()
    if result.error is not None:
        raise _our_error(result.error) or result.error
    with fsspec.open(training_record_uri(spec.output), "r") as handle:
        record = json.load(handle)
    return TrainReport(
        output=spec.output,
        sha256=record["sha256"],
        epochs=len(record["epochs"]),
        final_loss=record["epochs"][-1]["loss"],
        first_loss=record["epochs"][0]["loss"],
        wall_s=time.perf_counter() - started,
    )


def _check_can_start(spec: TrainSpec) -> None:
    """What would otherwise fail on a worker after Ray's start (the output: after training):
    the starting checkpoint is readable and the checkpoint's folder is writable."""
    from pipeline.io.writable import check_output_writable
    from pipeline.model.build import parse_state_dict, read_checkpoint_bytes

    if spec.init_checkpoint:
        blob, _ = read_checkpoint_bytes(spec.init_checkpoint, None)
        parse_state_dict(blob, spec.init_checkpoint)
    check_output_writable(posixpath.dirname(spec.output) or ".")


def _our_error(error: BaseException) -> GeoRetinaError | None:
    """The georetina error a worker raised, out of Ray Train's wrapping (its exit code)."""
    from ray.exceptions import RayTaskError

    failures = getattr(error, "worker_failures", None) or {}
    for failure in [error, *failures.values()]:
        while failure is not None:
            if isinstance(failure, GeoRetinaError) and not isinstance(failure, RayTaskError):
                return failure
            failure = getattr(failure, "cause", None) or failure.__cause__
    return None


@contextlib.contextmanager
def _relayed(
    epochs_queue: Any, on_epoch: Callable[[dict[str, float]], None] | None
) -> Iterator[None]:
    """While the body runs, hand what the workers put on the queue to ``on_epoch``."""
    if epochs_queue is None or on_epoch is None:
        yield
        return
    from ray.util.queue import Empty

    finished = threading.Event()

    def relay() -> None:
        while not finished.is_set() or not epochs_queue.empty():
            try:
                on_epoch(epochs_queue.get(timeout=0.5))
            except Empty:
                continue

    thread = threading.Thread(target=relay, name="georetina epochs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        finished.set()
        thread.join(timeout=10)
        epochs_queue.shutdown()
