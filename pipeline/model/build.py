"""RetinaNet construction (torchvision, no downloads) and safe checkpoint loading."""

from __future__ import annotations

import hashlib
import io
from functools import partial

import torch
from torch import nn
from torchvision.models import ResNet, resnet18, resnet50
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from pipeline.config import ModelSettings
from pipeline.errors import CheckpointError

# Untrained models are initialised from this seed, so two actors (or two runs) agree.
UNTRAINED_SEED = 0


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's transform without the resize: tiles run at the resolution they have.

    The stock transform rescales every input to ``min_size=800``; a 400-px tile would cost
    four times the compute and see objects at twice their trained size.
    """

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


def largest_stride(settings: ModelSettings) -> int:
    """Scene pixels per cell of the model's coarsest feature map (1 for ``threshold``).

    ResNet stage ``layer{k}`` has stride ``2 ** (k + 1)`` (layer2 = C3 = 8), and P6 and P7
    above the last stage asked for halve it twice more: 64 for the demo model (C3-C4),
    128 for ResNet-50 FPN on P3-P7. Tiles whose offsets are multiples of it see the feature
    grid the whole image would (see ``ops.tiles.axis_offsets``).
    """
    if settings.kind == "threshold":
        return 1
    return 2 ** (settings.fpn_stages[-1] + 1 + 2)


def _anchor_generator(settings: ModelSettings) -> AnchorGenerator:
    # Three scales per octave, as in the paper: 2^0, 2^(1/3), 2^(2/3).
    sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in settings.anchor_sizes)
    ratios = (tuple(settings.aspect_ratios),) * len(sizes)
    return AnchorGenerator(sizes, ratios)


def _fpn_backbone(body: ResNet, settings: ModelSettings) -> BackboneWithFPN:
    """ResNet stages -> FPN (+ P6, P7), named as torchvision's ``_resnet_fpn_extractor`` names
    them; stages above the last one asked for are not built at all."""
    stage_channels = body.inplanes // 8  # C2 width of a BasicBlock or Bottleneck ResNet
    in_channels = [stage_channels * 2 ** (stage - 1) for stage in settings.fpn_stages]
    width = settings.fpn_channels
    # v1 computes P6 from P5 (FPN output), v2 from C5 (the backbone), as torchvision does.
    if settings.backbone == "resnet50_fpn_v2":
        extra = LastLevelP6P7(in_channels[-1], width)
    else:
        extra = LastLevelP6P7(width, width)
    return_layers = {f"layer{stage}": str(i) for i, stage in enumerate(settings.fpn_stages)}
    return BackboneWithFPN(body, return_layers, in_channels, width, extra_blocks=extra)


def build_model(settings: ModelSettings, tile_size: int) -> RetinaNet:
    """A RetinaNet in eval mode with the job's classes, anchors and inference knobs.

    Layer names match torchvision's own builders, so their state dicts load unchanged.
    """
    torch.manual_seed(UNTRAINED_SEED)
    body = resnet18(weights=None) if settings.backbone == "resnet18_fpn" else resnet50(weights=None)
    backbone = _fpn_backbone(body, settings)
    anchors = _anchor_generator(settings)
    head = None
    if settings.backbone == "resnet50_fpn_v2":
        head = RetinaNetHead(
            backbone.out_channels,
            anchors.num_anchors_per_location()[0],
            settings.num_classes,
            norm_layer=partial(nn.GroupNorm, 32),
        )
        head.regression_head._loss_type = "giou"
    model = RetinaNet(
        backbone,
        settings.num_classes,
        min_size=tile_size,
        max_size=tile_size,
        anchor_generator=anchors,
        head=head,
        score_thresh=settings.score_threshold,
        nms_thresh=settings.nms_threshold,
        detections_per_img=settings.detections_per_tile,
        topk_candidates=settings.topk_candidates,
    )
    # Padded to a multiple of the largest stride (torchvision pads to 32): anchors are laid
    # at image size // feature size, which is the true stride only when it divides.
    model.transform = NoResizeTransform(
        tile_size,
        tile_size,
        list(settings.image_mean),  # of 0-1 inputs, as the model was trained with
        list(settings.image_std),
        size_divisible=largest_stride(settings),
    )
    return model.eval()


def read_checkpoint_bytes(uri: str, sha256: str | None) -> tuple[bytes, str]:
    """Fetch a checkpoint from a path or fsspec URI; check its sha256 when one is given."""
    import fsspec

    try:
        with fsspec.open(uri, "rb") as handle:
            blob = handle.read()
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {uri}: cannot be read: {error}") from None
    digest = hashlib.sha256(blob).hexdigest()
    if sha256 and digest != sha256:
        raise CheckpointError(f"checkpoint {uri}: sha256 is {digest}, the job expects {sha256}")
    return blob, digest


def parse_state_dict(blob: bytes, uri: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or ``torch.save`` bytes, never unpickling objects."""
    if uri.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            return _unwrap_lightning(load(blob))
        except Exception as error:  # noqa: BLE001 - safetensors' own error for a bad file
            raise CheckpointError(f"checkpoint {uri}: not a safetensors file ({error})") from None
    try:
        loaded = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise CheckpointError(
            f"checkpoint {uri}: not a loadable state dict ({error}); if it pickles objects, "
            "load it where you trust it and re-save torch.save(model.state_dict(), path)"
        ) from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(
        isinstance(value, torch.Tensor) for value in loaded.values()
    ):
        raise CheckpointError(f"checkpoint {uri}: does not hold a state dict of tensors")
    return _unwrap_lightning(loaded)


def _unwrap_lightning(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LightningModule's checkpoint (DeepForest's, for one) keeps the torchvision RetinaNet
    under ``model.``, beside metric buffers: keep the model's keys, without the prefix.

    DeepForest's weights on Hugging Face (``model.safetensors``) keep the prefix too."""
    prefix = "model."
    if not any(key.startswith("backbone.") for key in state) and any(
        key.startswith(prefix + "backbone.") for key in state
    ):
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return _head_v2_names(state)


def _head_v2_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Heads saved by torchvision before 0.12 (DeepForest's first NEON.pt) named their four
    convolutions ``conv.0``, ``conv.2``, ... (ReLUs between); now ``conv.0.0``, ``conv.1.0``.
    Renamed as torchvision's own ``_v1_to_v2_weights`` does when it loads such a file."""
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".conv.")
        index, _, kind = rest.partition(".")
        if rest and kind in ("weight", "bias") and index.isdigit() and ".head." in f".{head}":
            key = f"{head}.conv.{int(index) // 2}.0.{kind}"
        renamed[key] = value
    return renamed


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], uri: str) -> None:
    """Load strictly; a mismatch names the keys and shapes that differ."""
    own = model.state_dict()
    # A batch norm frozen in training (torchvision's and DeepForest's detectors from COCO
    # weights) saves no step counter; eval never reads it.
    state = {
        **{k: v for k, v in own.items() if k.endswith(".num_batches_tracked")},
        **state,
    }
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = [
        f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in sorted(set(own) & set(state))
        if state[key].shape != own[key].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append("shapes differ (classes or anchors?): " + "; ".join(wrong_shape[:5]))
        if missing:
            parts.append(f"{len(missing)} key(s) missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise CheckpointError(f"checkpoint {uri} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state)


def load_model(settings: ModelSettings, tile_size: int) -> tuple[RetinaNet, str]:
    """Build the model, load its checkpoint if any, and return it with its ``model_id``."""
    model = build_model(settings, tile_size)
    if settings.checkpoint is None:
        return model, settings.model_id()
    blob, digest = read_checkpoint_bytes(settings.checkpoint, settings.checkpoint_sha256)
    load_weights(model, parse_state_dict(blob, settings.checkpoint), settings.checkpoint)
    return model, settings.model_id(digest)


def model_id_for(settings: ModelSettings, tile_size: int) -> str:
    """The ``model_id``, after loading the checkpoint into the model it is meant for.

    Run on the driver before any tile is read, so a checkpoint that does not match the
    classes, anchors or backbone fails the job at once, not inside every detector actor.
    """
    if settings.kind == "threshold" or settings.checkpoint is None:
        return settings.model_id()
    return load_model(settings, tile_size)[1]
