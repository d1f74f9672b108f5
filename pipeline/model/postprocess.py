"""RetinaNet's inference postprocessing, batched: the same boxes as torchvision's, fewer syncs.

torchvision decodes and NMSes per image and per pyramid level in Python: a boolean filter,
a data-dependent ``topk`` and a ``where`` per level per image, then one NMS per image; every
one of those waits for the device. At GPU rates that waiting, not the network, sets the pace.
Here each level is one fixed-size ``topk`` over the whole batch (scores under the threshold
masked out, not filtered), decoding is one call, and on a GPU NMS is one call for the whole
batch with the image and the class folded into the coordinate offset (on the CPU, whose NMS
compares every pair it is given, one call per image). Tiles of one batch share a size,
so they share anchors.
"""

from __future__ import annotations

import torch
from torchvision.models.detection import RetinaNet
from torchvision.ops import boxes as box_ops
from torchvision.ops import nms

from pipeline.ops.boxes import SCORE_STEP

BELOW_THRESHOLD = -1.0  # the masked score: below any sigmoid output


def retinanet_detect(
    model: RetinaNet, images: torch.Tensor, one_nms_call: bool | None = None
) -> list[dict[str, torch.Tensor]]:
    """``model(list(images))`` in eval mode for a batch ``N×3×H×W`` of same-size tiles."""
    image_list, _ = model.transform(list(images))
    features = list(model.backbone(image_list.tensors).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(image_list, features)[0]
    per_level = [f.size(2) * f.size(3) for f in features]
    anchors_per_location = head_outputs["cls_logits"].size(1) // sum(per_level)
    return batched_postprocess(
        model,
        head_outputs["cls_logits"],
        head_outputs["bbox_regression"],
        anchors,
        [count * anchors_per_location for count in per_level],
        image_list.image_sizes[0],
        one_nms_call,
    )


def batched_postprocess(
    model: RetinaNet,
    logits: torch.Tensor,
    regression: torch.Tensor,
    anchors: torch.Tensor,
    anchors_per_level: list[int],
    image_size: tuple[int, int],
    one_nms_call: bool | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per image: boxes, scores and labels, as ``RetinaNet.postprocess_detections`` gives.

    ``logits`` ``N×A×K``, ``regression`` ``N×A×4``, ``anchors`` ``A×4`` (shared by the batch).
    ``one_nms_call``: one NMS for the batch (default on CUDA) or one per image (the CPU).
    """
    count, _, classes = logits.shape
    boxes, scores, labels, keys = [], [], [], []
    start = 0
    for level_size in anchors_per_level:
        level = torch.sigmoid(logits[:, start : start + level_size].reshape(count, -1))
        level = level.masked_fill(level <= model.score_thresh, BELOW_THRESHOLD)
        # Top-k by quantised score, ties by position: the same candidates in any batch.
        places = torch.arange(level.size(1), device=level.device).expand_as(level)
        top = decision_rank(level, places).topk(min(model.topk_candidates, level.size(1))).indices
        top_scores = level.gather(1, top)
        anchor_index = start + torch.div(top, classes, rounding_mode="floor")
        deltas = regression.gather(1, anchor_index.unsqueeze(-1).expand(-1, -1, 4))
        decoded = model.box_coder.decode_single(
            deltas.reshape(-1, 4), anchors[anchor_index.reshape(-1)]
        )
        boxes.append(decoded.reshape(count, -1, 4))
        scores.append(top_scores)
        labels.append(top % classes)
        keys.append(anchor_index * classes + top % classes)  # the candidate's place in the tile
        start += level_size
    all_boxes = box_ops.clip_boxes_to_image(torch.cat(boxes, 1), image_size)
    all_scores, all_labels = torch.cat(scores, 1), torch.cat(labels, 1)
    image_index = torch.arange(count, device=logits.device).unsqueeze(1).expand_as(all_scores)
    real = all_scores > model.score_thresh
    flat_boxes, flat_scores = all_boxes[real], all_scores[real]
    flat_labels, flat_images = all_labels[real], image_index[real]
    # NMS visits candidates in decision order: quantised score, then place in the tile.
    flat_order = decision_rank(flat_scores, torch.cat(keys, 1)[real])
    if one_nms_call is None:
        one_nms_call = logits.is_cuda
    if one_nms_call:
        # One NMS for the whole batch: one kernel and one sync instead of one per image.
        keep = _nms_by_group(flat_boxes, flat_order, flat_images * classes + flat_labels, model)
        # keep is in descending score order; a stable sort by image keeps that order per image.
        keep = keep[torch.sort(flat_images[keep], stable=True).indices]
    else:
        # The CPU's NMS compares every pair it is given: one call per image, not per batch
        # (a batch of 4 in one call took 2x torchvision's time, per image 0.6x).
        kept = []
        for image in range(count):
            mine = torch.nonzero(flat_images == image).squeeze(1)
            groups = flat_labels[mine]
            kept.append(mine[_nms_by_group(flat_boxes[mine], flat_order[mine], groups, model)])
        keep = torch.cat(kept)
    per_image = torch.bincount(flat_images[keep], minlength=count).tolist()
    detections = []
    for chunk in keep.split(per_image):
        chunk = chunk[: model.detections_per_img]
        detections.append(
            {"boxes": flat_boxes[chunk], "scores": flat_scores[chunk], "labels": flat_labels[chunk]}
        )
    return detections


def decision_rank(scores: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """A float64 key per score, distinct: higher for a higher quantised score, then for a
    smaller place (distinct integers), never for how a batch rounded a score's last bits.

    ``floor(score / SCORE_STEP)`` (at most 2^16) times the number of places, plus the place
    reversed: below 2^53, so exact in float64 (what NMS takes as scores).
    """
    span = int(places.max().item()) + 1 if places.numel() else 1
    steps = torch.floor(scores.double() / SCORE_STEP)
    return steps * span + (span - 1 - places).double()


def _nms_by_group(
    boxes: torch.Tensor, order: torch.Tensor, groups: torch.Tensor, model: RetinaNet
) -> torch.Tensor:
    """NMS within each group (image × class) in one call: groups are moved apart.

    ``order`` (:func:`decision_rank`) stands in for the scores: distinct, so the result does
    not hang on how the NMS kernel breaks ties. In float64: with many groups the offsets
    reach millions of pixels, where float32 would round box edges and change IoUs near the
    threshold.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    wide = boxes.double()
    offsets = groups.double() * (wide.max() + 1)
    return nms(wide + offsets[:, None], order, model.nms_thresh)
