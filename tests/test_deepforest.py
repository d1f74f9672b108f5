"""DeepForest's tree model: the preset, and its checkpoints as DeepForest lays them out.

The released weights are not downloaded here (no network in tests): each checkpoint below is
built with the layout and key names DeepForest writes, from deepforest 2.1.0's source:

- ``model.safetensors`` on Hugging Face (weecology/deepforest-tree): the LightningModule's
  state dict, the torchvision RetinaNet under ``model.`` (models/retinanet.py strips that
  prefix in ``_strip_legacy_prefix`` when it loads);
- a Lightning checkpoint (``deepforest.save_model`` / ``trainer.save_checkpoint``): the same
  under ``state_dict``, beside Lightning's own entries and DeepForest's ``label_dict`` and
  ``numeric_to_label_dict`` (main.py ``on_save_checkpoint``);
- ``NEON.pt``, DeepForest 1's file: a plain ``OrderedDict`` saved by torchvision before 0.12,
  its heads' convolutions named ``conv.0``, ``conv.2``, ...

A model fine-tuned from COCO weights (DeepForest's default) has frozen batch norms, which
save no ``num_batches_tracked``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import ModelSettings, parse_job
from pipeline.model.build import load_model

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "deepforest_tree.yaml"


def _deepforest_retinanet() -> torch.nn.Module:
    """DeepForest's ``RetinaNetHub``: torchvision's retinanet_resnet50_fpn backbone under a
    one-class RetinaNet with DeepForest's thresholds (models/retinanet.py)."""
    from torchvision.models.detection import RetinaNet, retinanet_resnet50_fpn

    torch.manual_seed(7)
    backbone = retinanet_resnet50_fpn(weights=None, weights_backbone=None).backbone
    model = RetinaNet(backbone=backbone, num_classes=1, score_thresh=0.1, nms_thresh=0.05)
    with torch.no_grad():  # weights unlike build_model's seeded ones, so loading shows
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.01 + 0.1)
    return model.eval()


def _frozen_bn(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))


def _v1_head_names(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """torchvision < 0.12's head names: ``conv.{2i}`` for today's ``conv.{i}.0``."""
    renamed = OrderedDict()
    for key, value in state.items():
        for i in range(4):
            for kind in ("weight", "bias"):
                for head in ("classification_head", "regression_head"):
                    new = f"head.{head}.conv.{i}.0.{kind}"
                    if key == new:
                        key = f"head.{head}.conv.{2 * i}.{kind}"
        renamed[key] = value
    return renamed


def _lightning_checkpoint(state: dict[str, torch.Tensor]) -> dict:
    """What ``trainer.save_checkpoint`` writes for DeepForest's LightningModule."""
    optimizer_state = {k: torch.zeros(2) for k in ("momentum_buffer",)}
    return {
        "epoch": 11,
        "global_step": 4800,
        "pytorch-lightning_version": "2.5.1",
        "state_dict": OrderedDict((f"model.{k}", v) for k, v in state.items()),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"current": {"ready": 12}}}},
        "callbacks": {},
        "optimizer_states": [{"state": {0: optimizer_state}, "param_groups": [{"lr": 0.001}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "config": {"architecture": "retinanet", "num_classes": 1, "nms_thresh": 0.05},
        },
        "label_dict": {"Tree": 0},
        "numeric_to_label_dict": {0: "Tree"},
    }


def _preset(checkpoint: Path) -> ModelSettings:
    settings = yaml.safe_load(PRESET.read_text())
    return ModelSettings(**{**settings, "checkpoint": str(checkpoint)})


def _save(path: Path, state_or_checkpoint: dict) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_or_checkpoint.items()}, str(path))
    else:
        torch.save(state_or_checkpoint, path)
    return path


@pytest.mark.parametrize(
    "name, layout",
    [
        ("model.safetensors", lambda s: OrderedDict((f"model.{k}", v) for k, v in s.items())),
        ("deepforest.ckpt", _lightning_checkpoint),
        ("NEON.pt", lambda s: _v1_head_names(_frozen_bn(s))),
        ("finetuned.ckpt", lambda s: _lightning_checkpoint(_frozen_bn(s))),
    ],
)
def test_deepforest_checkpoints_load_into_the_preset(tmp_path, name, layout):
    reference = _deepforest_retinanet()
    state = reference.state_dict()
    path = _save(tmp_path / name, layout(state))
    # The file holds nothing but tensors and plain containers: it loads with weights_only.
    if path.suffix != ".safetensors":
        torch.load(path, weights_only=True)

    model, model_id = load_model(_preset(path), 800)

    assert model_id.startswith("deepforest-tree:resnet50_fpn:")
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(loaded[key], value), key
    # The same network as DeepForest's on the same input: 0-1 pixels normalised by
    # ImageNet's mean and std, in both.
    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        normalised = reference.transform.normalize(image)
        torch.testing.assert_close(model.transform.normalize(image), normalised)
        ours = model.backbone(normalised[None])
        theirs = reference.backbone(normalised[None])
    for level in theirs:
        torch.testing.assert_close(ours[level], theirs[level])


def test_deepforest_feeds_its_400_px_patches_to_the_network_at_800():
    """Why the preset reads scenes at 5 cm: DeepForest's patches (patch_size 400 on 10 cm
    imagery) pass torchvision's transform, which scales them to min_size 800."""
    reference = _deepforest_retinanet()
    with torch.inference_mode():
        batch, _ = reference.transform([torch.rand(3, 400, 400)])
    assert batch.image_sizes == [(800, 800)]


def test_the_preset_says_deepforests_settings_and_names_its_checkpoint():
    settings = yaml.safe_load(PRESET.read_text())
    spec = parse_job({"inputs": ["x.tif"], "output": {"path": "out"}, "model": settings})
    model = spec.model
    assert (model.backbone, model.classes, model.fpn_stages) == (
        "resnet50_fpn",
        ["Tree"],
        [2, 3, 4],
    )
    assert model.anchor_sizes == [32, 64, 128, 256, 512]
    assert (model.score_threshold, model.nms_threshold) == (0.1, 0.05)
    np.testing.assert_allclose(model.image_mean, (0.485, 0.456, 0.406))
    np.testing.assert_allclose(model.image_std, (0.229, 0.224, 0.225))
    # 10 cm imagery, which DeepForest's transform doubles before the network sees it.
    assert model.resolution_m == 0.05
    assert "huggingface.co/weecology/deepforest-tree" in PRESET.read_text()


def test_a_missing_deepforest_checkpoint_says_which_file(tmp_path):
    from pipeline.errors import CheckpointError

    with pytest.raises(CheckpointError, match="deepforest-tree.safetensors"):
        load_model(_preset(tmp_path / "deepforest-tree.safetensors"), 800)


def test_other_normalisations_reach_the_network():
    from pipeline.model.build import build_model

    settings = ModelSettings(image_mean=(0.5, 0.5, 0.5), image_std=(1.0, 1.0, 1.0))
    model = build_model(settings, 64)
    assert list(model.transform.image_mean) == [0.5, 0.5, 0.5]
    assert list(model.transform.image_std) == [1.0, 1.0, 1.0]
