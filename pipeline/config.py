"""Job spec: what to process (inputs, output) and how (model, tiling, detection, merge).

Every model is ``frozen=True, extra="forbid"``: a misspelt YAML key fails loudly, and
:func:`load_job` reports *all* errors at once, each with its field path
(``tiling.overlap: Input should be less than ...``).
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import JobSpecError

Backbone = Literal["resnet18_fpn", "resnet50_fpn", "resnet50_fpn_v2"]


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# torchvision's detection transform normalises 0-1 inputs by ImageNet's statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Model fields added after jobs were first recorded: at their defaults they are left out of
# settings_hash, so older jobs keep their hash (and their ledger's done scenes).
_LATER_MODEL_FIELDS = ("resolution_m", "resolution_tolerance", "image_mean", "image_std")


class ModelSettings(_Strict):
    """How to detect: the network, its classes and its inference knobs."""

    kind: Literal["retinanet", "threshold"] = Field(
        "retinanet",
        description="'retinanet' (torchvision RetinaNet) or 'threshold', a deterministic "
        "reference detector that boxes bright blobs; used to validate tiling and "
        "georeferencing, it learns nothing.",
    )
    name: str = Field("retinanet", description="Human name; part of model_id.")
    backbone: Backbone = Field(
        "resnet18_fpn",
        description="ResNet trunk of the FPN: resnet18_fpn, resnet50_fpn (the "
        "paper's) or resnet50_fpn_v2 (torchvision's improved variant).",
    )
    classes: list[str] = Field(["object"], min_length=1, description="Class names, by id.")
    checkpoint: str | None = Field(
        None, description="Path or fsspec URI of a state dict (.pt/.pth or .safetensors)."
    )
    checkpoint_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="Expected sha256 of the checkpoint file (64 hex); checked when given.",
    )
    score_threshold: float = Field(
        0.05, ge=0.0, le=1.0, description="Boxes scoring below this are dropped (the paper's 0.05)."
    )
    nms_threshold: float = Field(0.5, gt=0.0, le=1.0, description="NMS IoU within a tile.")
    topk_candidates: int = Field(1000, gt=0, description="Candidates per pyramid level.")
    detections_per_tile: int = Field(
        1000,
        gt=0,
        description="Most boxes kept per tile (torchvision's 300 is low for dense scenes).",
    )
    fpn_stages: list[int] = Field(
        [2, 3, 4],
        min_length=1,
        description="ResNet stages feeding the FPN (2=C3, 3=C4, 4=C5); P6 and P7 are added "
        "above the last. [2, 3] drops C5: a much smaller model, for small objects.",
    )
    fpn_channels: int = Field(
        256, ge=8, description="Width of the FPN and of the heads (256 in the paper)."
    )
    anchor_sizes: list[int] = Field(
        [32, 64, 128, 256, 512], description="Anchor size per pyramid level (P3 upwards)."
    )
    aspect_ratios: list[float] = Field(
        [0.5, 1.0, 2.0], min_length=1, description="Anchor height/width ratios at every level."
    )
    threshold_level: int = Field(
        200, ge=1, le=255, description="kind=threshold: pixel level that counts as object."
    )
    threshold_min_pixels: int = Field(16, ge=1, description="kind=threshold: smallest blob.")
    resolution_m: float | None = Field(
        None,
        gt=0,
        description="Ground sample distance the model was trained at, in metres per pixel "
        "(`georetina train` records its data's in the checkpoint's .train.json). Scenes "
        "finer or coarser than this are resampled on read to it, and their boxes mapped back "
        "to the scene's own pixels; null: every scene is read at its own resolution.",
    )
    resolution_tolerance: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Scenes within this fraction of resolution_m (0.1 = ±10 %) are read as "
        "they are, without resampling.",
    )
    image_mean: tuple[float, float, float] = Field(
        IMAGENET_MEAN,
        description="Per-channel mean subtracted from the 0-1 input (pixels / 255) before "
        "the network; ImageNet's, as torchvision's detectors and DeepForest use.",
    )
    image_std: tuple[float, float, float] = Field(
        IMAGENET_STD,
        description="Per-channel standard deviation the centred 0-1 input is divided by.",
    )

    @model_validator(mode="after")
    def _one_anchor_size_per_level(self) -> ModelSettings:
        if sorted(set(self.fpn_stages)) != self.fpn_stages or not set(self.fpn_stages) <= {
            2,
            3,
            4,
        }:
            raise ValueError(
                f"fpn_stages must be increasing stages among 2, 3, 4: {self.fpn_stages}"
            )
        levels = len(self.fpn_stages) + 2
        if len(self.anchor_sizes) != levels:
            raise ValueError(
                f"anchor_sizes needs one size per pyramid level: {levels} levels "
                f"(fpn_stages {self.fpn_stages} + P6, P7), got {len(self.anchor_sizes)}"
            )
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def read_resolution(self) -> tuple[float, float] | None:
        """``(resolution_m, resolution_tolerance)`` for the pre-flight; None: no resampling."""
        if self.resolution_m is None:
            return None
        return self.resolution_m, self.resolution_tolerance

    def model_id(self, checkpoint_sha256: str | None = None) -> str:
        """``name:backbone:<12 hex of the checkpoint's sha256>`` (or ``...:untrained``)."""
        if self.kind == "threshold":
            return f"threshold:{self.threshold_level}:{self.threshold_min_pixels}"
        weights = checkpoint_sha256[:12] if checkpoint_sha256 else "untrained"
        return f"{self.name}:{self.backbone}:{weights}"


class TilingSettings(_Strict):
    """How scenes are cut into tiles and scaled to the model's uint8 input."""

    tile_size: int = Field(512, ge=32, le=8192, description="Tile side in pixels.")
    overlap: int = Field(
        64, ge=0, description="Pixels shared by neighbouring tiles; >= the largest object."
    )
    bands: list[int] | None = Field(
        None, description="1-based band indexes, e.g. [4, 3, 2]; default: first 3 (or 1)."
    )
    scale_range: tuple[float, float] | None = Field(
        None, description="Input values mapped linearly onto 0..255; default: dtype's range."
    )
    tiles_per_read_task: int = Field(16, ge=1, description="Tiles one open dataset serves.")
    read_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest a scene's pre-flight, or one read task of it, may take; past it "
        "the scene fails with a timeout (a hung server or mount) and the others go on.",
    )
    allow_pixel_coordinates: bool = Field(
        False,
        description="A scene with no CRS or no geotransform (a drone photo, a scan): false "
        "fails it with a clear error; true detects on it anyway, its rows with their pixel "
        "boxes only (geometry, bbox and scene_crs null).",
    )

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> TilingSettings:
        if self.overlap >= self.tile_size // 2:
            raise ValueError(
                f"overlap ({self.overlap}) must be less than half of tile_size ({self.tile_size})"
            )
        return self


# Default read-ahead per detector actor (detect.inflight_mb_per_actor).
CPU_INFLIGHT_MB = 64
GPU_INFLIGHT_MB = 128


class DetectSettings(_Strict):
    """Where and how fast inference runs."""

    precision: Literal["bf16", "fp16", "fp32"] = Field(
        "bf16", description="Autocast dtype on CUDA; the CPU always runs fp32."
    )
    batch_size: int = Field(4, ge=1, description="Tiles per forward pass of a detector actor.")
    num_actors: int = Field(1, ge=1, description="Detector actors in the pool.")
    num_gpus_per_actor: float = Field(0.0, ge=0.0, description="0 = CPU; 0.5 = two per GPU.")
    num_cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs Ray reserves per actor.")
    inflight_mb_per_actor: int = Field(
        None,  # filled in by _inflight_default, from where the actor runs
        ge=16,
        description="Tiles read ahead and queued in Ray's object store, per detector actor; "
        f"bounds memory whatever the size of the rasters. Default: {CPU_INFLIGHT_MB} MB per "
        f"CPU actor, {GPU_INFLIGHT_MB} MB per GPU actor.",
    )
    torch_threads: int | None = Field(
        None, ge=1, description="CPU inference threads per actor; default: cores / num_actors."
    )
    stall_timeout_s: float = Field(
        600.0,
        gt=0,
        description="No tile back for this long (an actor that dies at every start, a batch "
        "that kills every actor, GPUs that never come): the scenes in flight fail and the run "
        "ends. Ten minutes by default: a stuck run says so soon, and an autoscaler brings a GPU "
        "node up from zero in about five; raise it where nodes take longer.",
    )

    def threads_per_actor(self) -> int:
        """CPU inference threads an actor uses: ``torch_threads``, else the node's cores
        shared among the pool's actors (called where the actor runs)."""
        return self.torch_threads or max(1, (os.cpu_count() or 1) // self.num_actors)

    @model_validator(mode="before")
    @classmethod
    def _inflight_default(cls, data: Any) -> Any:
        # A CPU actor eats a few tiles a second: a deeper read-ahead only holds memory (the
        # tiling bench's 32k scene peaked at 2323 MB with 128 MB, 2099 MB with 64, as fast).
        # A GPU eats a read task's tiles in a fraction of a second: many reads in flight.
        if isinstance(data, dict) and data.get("inflight_mb_per_actor") is None:
            try:
                on_gpu = float(data.get("num_gpus_per_actor") or 0) > 0
            except (TypeError, ValueError):
                on_gpu = False  # the field's own validation reports it
            data = {**data, "inflight_mb_per_actor": GPU_INFLIGHT_MB if on_gpu else CPU_INFLIGHT_MB}
        return data


class MergeSettings(_Strict):
    """How cross-tile duplicates are removed."""

    iou_threshold: float = Field(0.5, gt=0.0, le=1.0, description="Overlap that suppresses.")
    metric: Literal["iou", "ios"] = Field(
        "iou", description="'iou', or 'ios': intersection over the smaller box."
    )
    class_aware: bool = Field(True, description="False: boxes of any class suppress each other.")
    mode: Literal["suppress", "merge"] = Field(
        "suppress", description="'merge': the kept box grows to the union of its group."
    )
    edge_tolerance: float = Field(
        2.0, ge=0.0, description="Pixels from an inner tile edge within which a box is cut."
    )
    min_valid_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Boxes with less of their area on valid pixels drop."
    )


class OutputSettings(_Strict):
    path: str = Field(..., description="Directory or fsspec URI for GeoParquet + ledger.")
    crs: str = Field("OGC:CRS84", description="CRS of the geometry column, for every scene.")
    row_group_size: int = Field(10_000, ge=100, description="Rows per Parquet row group.")
    compact: str | None = Field(
        None,
        description="Directory or fsspec URI of a spatially partitioned dataset that each run "
        "with scenes done compacts the output into, after the run (`georetina compact`); "
        "null: none.",
    )

    @property
    def vrt_folder(self) -> str:
        """Where mosaic inputs' VRTs are written: beside the output, so every node reads them."""
        return f"{self.path.rstrip('/')}/_vrt"


def parse_datetime_interval(text: str) -> tuple[datetime | None, datetime | None]:
    """A STAC ``datetime`` filter: an RFC 3339 instant or ``start/end`` with ``..`` open ends.

    Naive times are UTC. Raises ``ValueError`` naming the part that does not parse.
    """

    def parse(part: str) -> datetime | None:
        if part in ("", ".."):
            return None
        try:
            value = datetime.fromisoformat(part.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{part!r} is not an RFC 3339 time (e.g. 2026-06-01T00:00:00Z)"
            ) from None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    parts = text.split("/")
    if len(parts) > 2:
        raise ValueError(f"{text!r}: use an instant or one 'start/end' interval")
    start = parse(parts[0])
    end = parse(parts[1]) if len(parts) == 2 else start
    if start and end and start > end:
        raise ValueError(f"{text!r}: the interval ends before it starts")
    return start, end


class StacSearch(_Strict):
    """STAC items to process: from a static catalog (pystac) or an API search (pystac-client).

    The same filters apply to both; a static catalog is filtered while it is walked.
    """

    catalog: str | None = Field(
        None, description="Path or fsspec URI of a static catalog or collection JSON."
    )
    api: str | None = Field(None, description="Root URL of a STAC API (item search).")
    asset: str = Field(..., min_length=1, description="Asset key of the raster, e.g. 'visual'.")
    collections: list[str] | None = Field(None, min_length=1, description="Collection ids.")
    bbox: tuple[float, float, float, float] | None = Field(
        None, description="[west, south, east, north] in longitude/latitude."
    )
    datetime: str | None = Field(
        None,
        description="RFC 3339 instant or interval, '..' for an open end: "
        "'2026-06-01T00:00:00Z/..'.",
    )
    lookback_days: float | None = Field(
        None, gt=0, description="Items of the last N days (a window ending now); for nightly jobs."
    )
    max_items: int | None = Field(None, ge=1, description="Stop after this many items.")

    @field_validator("datetime")
    @classmethod
    def _interval_parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_datetime_interval(value)
        return value

    @field_validator("bbox")
    @classmethod
    def _bbox_ordered(
        cls, value: tuple[float, float, float, float] | None
    ) -> tuple[float, float, float, float] | None:
        if value is not None and (value[0] > value[2] or value[1] > value[3]):
            raise ValueError(f"{list(value)}: expected [west, south, east, north]")
        return value

    @model_validator(mode="after")
    def _one_source_one_window(self) -> StacSearch:
        if (self.catalog is None) == (self.api is None):
            raise ValueError("name exactly one of 'catalog' (static) or 'api' (search)")
        if self.datetime is not None and self.lookback_days is not None:
            raise ValueError("name 'datetime' or 'lookback_days', not both")
        return self

    def window(self, now: datetime | None = None) -> tuple[datetime | None, datetime | None]:
        """The time window as (start, end), either end open (None)."""
        if self.lookback_days is not None:
            from datetime import timedelta

            end = now or datetime.now(UTC)
            return end - timedelta(days=self.lookback_days), end
        if self.datetime is not None:
            return parse_datetime_interval(self.datetime)
        return None, None


class ListInput(_Strict):
    """A text file of paths, URIs or globs, one per line (``#`` comments, blanks ignored);
    relative lines are relative to the list file."""

    uris: str = Field(..., alias="list", description="Path or fsspec URI of the list file.")


class StacInput(_Strict):
    stac: StacSearch = Field(..., description="A STAC catalog or API search to take items from.")


class MosaicInput(_Strict):
    """Adjacent rasters in one CRS and resolution (a grid of orthophoto tiles), read as one
    scene through a GDAL VRT built by the job: tiles span the files' boundaries."""

    mosaic: str | list[str] = Field(
        ...,
        description="The member rasters: a path or fsspec glob, or a list of paths, URIs or "
        "globs (local, s3://, gs://, http(s)://, az://: GDAL reads them through the VRT).",
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="The scene's name (its id is the name and a hash of the members' "
        "patterns); default 'mosaic'.",
    )


def _input_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "path"
    if isinstance(value, dict):
        if "list" in value:
            return "list"
        if "stac" in value:
            return "stac"
        if "mosaic" in value:
            return "mosaic"
    if isinstance(value, MosaicInput):
        return "mosaic"
    if isinstance(value, ListInput):
        return "list"
    if isinstance(value, StacInput):
        return "stac"
    return None


InputItem = Annotated[
    Annotated[str, Tag("path")]
    | Annotated[ListInput, Tag("list")]
    | Annotated[StacInput, Tag("stac")]
    | Annotated[MosaicInput, Tag("mosaic")],
    Discriminator(
        _input_kind,
        custom_error_type="input_kind",
        custom_error_message="an input is a path or glob, {list: FILE} or {stac: {...}}, or "
        "{mosaic: GLOB_OR_LIST}",
    ),
]


class JobSpec(_Strict):
    """One job file: inputs, model, tiling, detection, merge and output settings."""

    name: str = Field(
        "job", pattern=r"^[A-Za-z0-9_.-]+$", description="Job name (letters, digits, . _ -)."
    )
    inputs: list[InputItem] = Field(
        ...,
        min_length=1,
        description="Paths or fsspec globs, list files ({list: uris.txt}), STAC sources "
        "({stac: {catalog | api, asset, collections, bbox, datetime | lookback_days}}) and "
        "mosaics of adjacent rasters read as one scene ({mosaic: GLOB_OR_LIST, name: ...}).",
    )
    model: ModelSettings = ModelSettings()
    tiling: TilingSettings = TilingSettings()
    detect: DetectSettings = DetectSettings()
    merge: MergeSettings = MergeSettings()
    output: OutputSettings

    @model_validator(mode="after")
    def _tiles_fit_the_inflight_budget(self) -> JobSpec:
        problem = memory_problem(self.tiling, self.detect)
        if problem:
            raise ValueError(problem)
        return self

    def settings_hash(self) -> str:
        """Hash of every setting that changes results (not where they are written or how fast)."""
        relevant = {
            "model": _hashed_model_settings(self.model),
            "tiling": self.tiling.model_dump(exclude={"tiles_per_read_task", "read_timeout_s"}),
            "merge": self.merge.model_dump(),
            "crs": self.output.crs,
        }
        blob = json.dumps(relevant, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _hashed_model_settings(model: ModelSettings) -> dict[str, Any]:
    """The model's settings as they enter settings_hash: the later fields only when set."""
    dumped = model.model_dump()
    for name in _LATER_MODEL_FIELDS:
        unused = name == "resolution_tolerance" and model.resolution_m is None
        if unused or dumped[name] == ModelSettings.model_fields[name].default:
            del dumped[name]
    return dumped


# A tile in flight holds its 3 x H x W uint8 image and its mask (one bit a pixel): 4 bytes a
# pixel leaves room for the copies made on its way (the read's arrays, their object).
TILE_BYTES_PER_PIXEL = 4


def memory_problem(tiling: TilingSettings, detect: DetectSettings) -> str | None:
    """Why a read task's chunk or a detector batch cannot fit the in-flight budget, or None.

    A read task's chunk is held whole: a chunk larger than ``detect.inflight_mb_per_actor`` is
    not slowed down by the budget, it overruns it (and a huge tile would take a node's memory down
    mid-run). Refused here, before any scene is opened, with the fields to change.
    """
    tile_mb = tiling.tile_size**2 * TILE_BYTES_PER_PIXEL / 2**20
    budget = detect.inflight_mb_per_actor
    for what, tiles, field in (
        ("a read task", tiling.tiles_per_read_task, "tiling.tiles_per_read_task"),
        ("a detector batch", detect.batch_size, "detect.batch_size"),
    ):
        if tiles * tile_mb > budget:
            fits = int(budget // tile_mb)
            fix = f"lower {field} to {fits}" if fits >= 1 else "lower tiling.tile_size"
            return (
                f"{what} of {tiles} tile(s) of {tiling.tile_size} px holds "
                f"{tiles * tile_mb:.0f} MB, more than detect.inflight_mb_per_actor "
                f"({budget} MB): {fix}, "
                "or raise detect.inflight_mb_per_actor if the nodes have the memory"
            )
    return None


def _format_errors(error: ValidationError) -> list[str]:
    lines = []
    for item in error.errors():
        # A tagged union (inputs) repeats its tag in the path: inputs.0.stac.stac.asset.
        parts = [str(part) for part in item["loc"]]
        parts = [p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1]]
        path = ".".join(parts) or "(top level)"
        lines.append(f"{path}: {item['msg']}")
    return lines


def parse_job(data: Any, source: str = "<job>") -> JobSpec:
    """Validate a job mapping; raise :class:`JobSpecError` listing every bad field."""
    if not isinstance(data, dict):
        raise JobSpecError(source, ["(top level): a job file must be a mapping"])
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise JobSpecError(source, _format_errors(error)) from None


def _read_yaml(path: Path) -> Any:
    """Safe loader: no tags, no code; unreadable or malformed files name the file."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as error:
        raise JobSpecError(str(path), [f"(file): cannot read: {error}"]) from None
    except yaml.YAMLError as error:
        raise JobSpecError(str(path), [f"(yaml): {error}"]) from None


def load_job(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read a job YAML (safe loader: no tags, no code) and validate it.

    A relative ``output.path``, ``output.compact`` or input path is taken relative to the job
    file's folder, so a job file means the same thing wherever it is run from.
    """
    path = Path(path)
    data = _read_yaml(path)
    if isinstance(data, dict):
        data = _resolve_relative_paths(data, path.parent)
        for key, value in (overrides or {}).items():
            data[key] = value
    return parse_job(data, str(path))


def _join(base: Path, relative: str) -> str:
    # Absolute: Ray workers (Ray Train sets their cwd) must find the same file.
    return os.path.normpath(base.absolute() / relative)


def _is_local_relative(uri: str) -> bool:
    return "://" not in uri and not Path(uri).is_absolute()


def _resolve_model_preset(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """``model: preset.yaml`` loaded into a mapping; a relative checkpoint made absolute."""
    model = data.get("model")
    if isinstance(model, str):
        # A model preset: a YAML file of model settings (see configs/).
        preset = _join(base, model) if _is_local_relative(model) else model
        try:
            model = yaml.safe_load(Path(preset).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise JobSpecError(
                str(base), [f"model: cannot load preset {model!r}: {error}"]
            ) from None
        # The preset's own relative paths (its checkpoint) are relative to the preset.
        base = Path(preset).parent
    if isinstance(model, dict) and isinstance(model.get("checkpoint"), str):
        if _is_local_relative(model["checkpoint"]):
            model = {**model, "checkpoint": _join(base, model["checkpoint"])}
    return {} if model is None else {"model": model}


def _resolve_input(item: Any, base: Path) -> Any:
    """A relative path, list file or static catalog is relative to the job file's folder."""
    if isinstance(item, str):
        return _join(base, item) if _is_local_relative(item) else item
    if isinstance(item, dict) and isinstance(item.get("list"), str):
        if _is_local_relative(item["list"]):
            return {**item, "list": _join(base, item["list"])}
    if isinstance(item, dict) and isinstance(item.get("mosaic"), (str, list)):
        members = item["mosaic"]
        if isinstance(members, str):
            return {**item, "mosaic": _resolve_input(members, base)}
        return {**item, "mosaic": [_resolve_input(m, base) for m in members]}
    if isinstance(item, dict) and isinstance(item.get("stac"), dict):
        stac = item["stac"]
        if isinstance(stac.get("catalog"), str) and _is_local_relative(stac["catalog"]):
            return {**item, "stac": {**stac, "catalog": _join(base, stac["catalog"])}}
    return item


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    data = dict(data)
    inputs = data.get("inputs")
    if isinstance(inputs, list):
        data["inputs"] = [_resolve_input(item, base) for item in inputs]
    output = data.get("output")
    if isinstance(output, dict):
        output = dict(output)
        for key in ("path", "compact"):
            if isinstance(output.get(key), str) and _is_local_relative(output[key]):
                output[key] = _join(base, output[key])
        data["output"] = output
    data.update(_resolve_model_preset(data, base))
    return data


# --------------------------------------------------------------------------------------------
# Training spec (``georetina train TRAIN.yaml``)
# --------------------------------------------------------------------------------------------


class LabelSource(_Strict):
    """Boxes to learn from: geo labels over one raster, or a pixel CSV naming its rasters."""

    labels: str = Field(
        ...,
        description="GeoParquet / GeoJSON / GeoPackage boxes in any CRS, or a pixel CSV "
        "(image_path, xmin, ymin, xmax, ymax, label; DeepForest's format).",
    )
    raster: str | None = Field(None, description="The raster geo labels lie on (not for CSV).")
    class_column: str = Field(
        "label", description="Column holding class names; optional with one class."
    )

    @model_validator(mode="after")
    def _raster_for_geo_labels(self) -> LabelSource:
        if not self.labels.lower().endswith(".csv") and self.raster is None:
            raise ValueError(f"labels {self.labels!r} are geo labels: name their `raster`")
        return self


class ChipSettings(_Strict):
    """Training chips: sampled around labels and from the background, each epoch anew."""

    size: int = Field(256, ge=32, le=2048, description="Chip side in pixels.")
    per_epoch: int = Field(512, ge=1, description="Chips per epoch (over all workers).")
    background_fraction: float = Field(
        0.25, ge=0.0, le=1.0, description="Share of chips sampled away from labels."
    )
    min_visible: float = Field(
        0.6, gt=0.0, le=1.0, description="A box cut by the chip edge counts if this much shows."
    )


class OptimSettings(_Strict):
    """RetinaNet's recipe: SGD with momentum, weight decay, warm-up and step decays."""

    epochs: int = Field(12, ge=1, description="Passes over per_epoch chips.")
    batch_size: int = Field(8, ge=1, description="Chips per step, per worker.")
    optimizer: Literal["sgd", "adamw"] = Field(
        "sgd",
        description="'sgd' (the paper's, with momentum) or 'adamw' (converges in fewer steps "
        "from random weights, useful on CPUs; use learning_rate ~1e-3 with it).",
    )
    learning_rate: float = Field(0.01, gt=0.0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum.")
    weight_decay: float = Field(
        1e-4, ge=0.0, description="L2 penalty; not applied to norms and biases."
    )
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up from lr/10.")
    lr_steps: list[float] = Field(
        [0.67, 0.89],
        description="Fractions of training at which lr is multiplied by lr_gamma "
        "(the paper's 60k and 80k of 90k iterations).",
    )
    lr_gamma: float = Field(0.1, gt=0.0, le=1.0, description="Factor at each of lr_steps.")
    focal_alpha: float = Field(
        0.25, ge=0.0, le=1.0, description="Focal loss weight of positives (the paper's 0.25)."
    )
    focal_gamma: float = Field(
        2.0, ge=0.0, description="Focal loss focusing exponent (the paper's 2)."
    )
    grad_clip: float | None = Field(10.0, gt=0.0, description="Max gradient norm; null = off.")


class TrainScaling(_Strict):
    """Ray Train workers: one per GPU, or CPU workers."""

    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(
        1.0, gt=0.0, description="CPUs per worker; also its torch threads on a CPU."
    )


class TrainSpec(_Strict):
    """One training file: model settings, label sources, chips, optimiser, output checkpoint."""

    name: str = Field(
        "train", pattern=r"^[A-Za-z0-9_.-]+$", description="Training name (letters, digits, . _ -)."
    )
    model: ModelSettings = Field(
        ModelSettings(),
        description="As in a job (a preset path works); its checkpoint is not used here.",
    )
    init_checkpoint: str | None = Field(
        None,
        description="Weights to start from (fine-tuning, e.g. a DeepForest or torchvision "
        "checkpoint); tensors whose shapes differ (another class list) start fresh.",
    )
    data: list[LabelSource] = Field(..., min_length=1, description="Labelled rasters.")
    bands: list[int] | None = Field(None, description="As tiling.bands in a job.")
    scale_range: tuple[float, float] | None = Field(
        None, description="As tiling.scale_range in a job."
    )
    chips: ChipSettings = Field(ChipSettings(), description="Training chips.")
    optim: OptimSettings = Field(OptimSettings(), description="Optimiser and schedule.")
    scaling: TrainScaling = Field(TrainScaling(), description="Ray Train workers.")
    output: str = Field(..., description="Checkpoint to write (.safetensors), path or URI.")
    save_dtype: Literal["fp32", "fp16"] = Field(
        "fp32", description="fp16 halves the file; loading converts back to fp32."
    )
    seed: int = Field(0, description="Seed of chip sampling and weight init.")

    @model_validator(mode="after")
    def _retinanet_only(self) -> TrainSpec:
        if self.model.kind != "retinanet":
            raise ValueError("model.kind must be 'retinanet' to train")
        if not self.output.endswith(".safetensors"):
            raise ValueError(f"output {self.output!r} must end in .safetensors")
        return self


def load_train_spec(path: str | Path) -> TrainSpec:
    """Read a training YAML; relative label, raster and output paths are relative to it."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise JobSpecError(str(path), ["(top level): a training file must be a mapping"])
    base = path.parent
    data = {**data, **_resolve_model_preset(data, base)}
    for key in ("output", "init_checkpoint"):
        if isinstance(data.get(key), str) and _is_local_relative(data[key]):
            data[key] = _join(base, data[key])
    if isinstance(data.get("data"), list):
        data["data"] = [
            {
                **item,
                **{
                    key: _join(base, item[key])
                    for key in ("labels", "raster")
                    if isinstance(item.get(key), str) and _is_local_relative(item[key])
                },
            }
            if isinstance(item, dict)
            else item
            for item in data["data"]
        ]
    try:
        return TrainSpec.model_validate(data)
    except ValidationError as error:
        raise JobSpecError(str(path), _format_errors(error)) from None


# --------------------------------------------------------------------------------------------
# JSON Schema (``georetina schema job|train``), for editors' YAML language servers
# --------------------------------------------------------------------------------------------

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def job_schema() -> dict[str, Any]:
    """The JSON Schema of a job file, with every field's description and default."""
    return _file_schema(JobSpec.model_json_schema(), "georetina job file")


def train_schema() -> dict[str, Any]:
    """The JSON Schema of a training file (``georetina train``)."""
    return _file_schema(TrainSpec.model_json_schema(), "georetina training file")


def _file_schema(schema: dict[str, Any], title: str) -> dict[str, Any]:
    """The models' schema, plus what the loader accepts before validation: ``model`` may
    name a preset file, and ``detect.inflight_mb_per_actor`` may be null (the default)."""
    schema = {"$schema": JSON_SCHEMA_DIALECT, **schema, "title": title}
    model = schema["properties"]["model"]
    preset = {"type": "string", "description": "A model preset: YAML file of model settings."}
    described = model.pop("description", None) or schema["$defs"]["ModelSettings"]["description"]
    schema["properties"]["model"] = {
        "anyOf": [{"$ref": model.pop("$ref")}, preset],
        "description": described,
        **model,
    }
    detect = schema["$defs"].get("DetectSettings")
    if detect is not None:
        inflight = detect["properties"]["inflight_mb_per_actor"]
        number = {"type": inflight.pop("type"), "minimum": inflight.pop("minimum")}
        inflight["anyOf"] = [number, {"type": "null"}]
    return schema
