"""``georetina evaluate DETECTIONS LABELS``: COCO metrics (pycocotools) in CRS coordinates.

Detections and labels are reprojected to one metric CRS and matched there, never in pixels:
labels may come from another raster, another resolution or a GIS. pycocotools does the
matching and the AP; boxes are first split into groups that can possibly match (connected
components of intersecting boxes), which leaves COCO's results unchanged (boxes that do
not intersect have IoU 0 and never match) while keeping each IoU matrix small.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import InvalidInputError


class EvaluationError(InvalidInputError):
    """Inputs that cannot be evaluated: the message names the file or column."""


COCO_IOUS = np.linspace(0.5, 0.95, 10)


@dataclass(frozen=True)
class ClassScores:
    ap: float  # COCO mAP@[.5:.95]
    ap50: float
    ap75: float
    precision: float  # at the chosen IoU and score
    recall: float
    labels: int
    detections: int  # at or above the chosen score


@dataclass(frozen=True)
class Evaluation:
    iou: float
    score: float
    crs: str
    overall: ClassScores
    per_class: dict[str, ClassScores] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """``name: value`` lines, overall then per class."""
        o = self.overall
        out = [
            f"mAP: {o.ap:.4f}",
            f"AP50: {o.ap50:.4f}",
            f"AP75: {o.ap75:.4f}",
            f"precision: {o.precision:.4f}",
            f"recall: {o.recall:.4f}",
            f"labels: {o.labels}",
            f"detections: {o.detections}",
        ]
        for name, c in self.per_class.items():
            out.append(
                f"class {name}: AP {c.ap:.4f} AP50 {c.ap50:.4f} precision {c.precision:.4f} "
                f"recall {c.recall:.4f} ({c.labels} labels, {c.detections} detections)"
            )
        return out


def components(boxes: np.ndarray) -> np.ndarray:
    """Group id per box: connected components of the 'boxes intersect' graph."""
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    geometries = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    left, right = shapely.STRtree(geometries).query(geometries, predicate="intersects")
    graph = coo_matrix((np.ones(len(left)), (left, right)), shape=(len(boxes), len(boxes)))
    return connected_components(graph, directed=False)[1]


def coco_evaluate(
    truth: np.ndarray,
    truth_classes: np.ndarray,
    found: np.ndarray,
    found_classes: np.ndarray,
    scores: np.ndarray,
    class_names: list[str],
    iou: float = 0.5,
    score: float = 0.5,
) -> tuple[ClassScores, dict[str, ClassScores]]:
    """COCO AP (pycocotools) and precision/recall at ``iou`` and ``score``.

    Boxes are ``(x0, y0, x1, y1)`` in one metric CRS; classes index ``class_names``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    every = np.concatenate([truth, found]).reshape(-1, 4)
    origin = np.tile(every[:, :2].min(axis=0), 2) if len(every) else np.zeros(4)
    truth, found = truth - origin, found - origin  # metres from the corner: small numbers
    groups = components(every - origin)
    truth_image, found_image = groups[: len(truth)], groups[len(truth) :]

    def xywh(b: np.ndarray) -> list[float]:
        return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]

    dataset = {
        "images": [{"id": int(i)} for i in np.unique(groups)],
        "categories": [{"id": k, "name": name} for k, name in enumerate(class_names)],
        "annotations": [
            {
                "id": n + 1,
                "image_id": int(truth_image[n]),
                "category_id": int(truth_classes[n]),
                "bbox": xywh(box),
                "area": float((box[2] - box[0]) * (box[3] - box[1])),
                "iscrowd": 0,
            }
            for n, box in enumerate(truth)
        ],
    }
    ious = np.unique(np.round(np.append(COCO_IOUS, iou), 4))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        results = [
            {
                "image_id": int(found_image[n]),
                "category_id": int(found_classes[n]),
                "bbox": xywh(box),
                "score": float(scores[n]),
            }
            for n, box in enumerate(found)
        ]
        dt = gt.loadRes(results) if results else COCO()
        if not results:
            dt.dataset = {"images": dataset["images"], "categories": dataset["categories"]}
            dt.dataset["annotations"] = []
            dt.createIndex()
        evaluator = COCOeval(gt, dt, "bbox")
        evaluator.params.iouThrs = ious
        evaluator.params.areaRng = [[0.0, 1e18]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.params.maxDets = [max(100, int(np.bincount(found_image).max(initial=0)))]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"]  # [T, R, K, A, M]; -1 where undefined
    coco_t = np.isin(np.round(ious, 4), np.round(COCO_IOUS, 4))
    t50, t75, t_iou = (int(np.argmin(np.abs(ious - v))) for v in (0.5, 0.75, iou))

    def mean_ap(p: np.ndarray) -> float:
        p = p[p > -1]
        return float(p.mean()) if p.size else 0.0

    def at_threshold(k: int | None) -> tuple[int, int, int]:
        tp = found_n = truth_n = 0
        for record in evaluator.evalImgs:
            if record is None or (k is not None and record["category_id"] != k):
                continue
            kept = (np.asarray(record["dtScores"]) >= score) & ~record["dtIgnore"][t_iou]
            tp += int((record["dtMatches"][t_iou][kept] > 0).sum())
            found_n += int(kept.sum())
            truth_n += int((~np.asarray(record["gtIgnore"], bool)).sum())
        return tp, found_n, truth_n

    def scores_for(k: int | None) -> ClassScores:
        p = precision if k is None else precision[:, :, [k]]
        tp, found_n, truth_n = at_threshold(k)
        return ClassScores(
            ap=mean_ap(p[coco_t]),
            ap50=mean_ap(p[t50]),
            ap75=mean_ap(p[t75]),
            precision=tp / found_n if found_n else 0.0,
            recall=tp / truth_n if truth_n else 0.0,
            labels=truth_n,
            detections=found_n,
        )

    return scores_for(None), {name: scores_for(k) for k, name in enumerate(class_names)}


def _read_frame(uri: str, role: str) -> Any:
    import geopandas

    try:
        if uri.lower().endswith((".parquet", ".geoparquet")) or "." not in uri.rsplit("/", 1)[-1]:
            return geopandas.read_parquet(uri)
        return geopandas.read_file(uri)
    except Exception as error:  # noqa: BLE001 - pyarrow/GDAL raise many kinds for a bad file
        raise EvaluationError(f"{role} {uri}: cannot be read: {error}") from None


def evaluate_files(
    detections_uri: str,
    labels_uri: str,
    iou: float = 0.5,
    score: float = 0.5,
    class_column: str = "label",
) -> Evaluation:
    """Evaluate a detections GeoParquet (one scene file or an output folder) against labels."""
    detections = _read_frame(detections_uri, "detections")
    labels = _read_frame(labels_uri, "labels")
    for frame, uri, role in (
        (detections, detections_uri, "detections"),
        (labels, labels_uri, "labels"),
    ):
        if frame.crs is None:
            raise EvaluationError(f"{role} {uri}: no CRS")
    if "class_name" not in detections.columns or "score" not in detections.columns:
        raise EvaluationError(f"detections {detections_uri}: needs class_name and score columns")
    if class_column in labels.columns:
        label_names = [str(v) for v in labels[class_column]]
    else:
        classes = sorted(set(detections["class_name"]))
        if len(classes) > 1:
            raise EvaluationError(
                f"labels {labels_uri}: no column {class_column!r} and detections have "
                f"{len(classes)} classes"
            )
        label_names = [classes[0] if classes else "object"] * len(labels)
    metric = labels.crs if labels.crs.is_projected else labels.estimate_utm_crs()
    if detections.crs.is_projected and not labels.crs.is_projected:
        metric = detections.crs
    names = sorted(set(label_names) | set(detections["class_name"]))
    index = {name: k for k, name in enumerate(names)}
    overall, per_class = coco_evaluate(
        labels.to_crs(metric).geometry.bounds.to_numpy(np.float64),
        np.array([index[n] for n in label_names], dtype=np.int64),
        detections.to_crs(metric).geometry.bounds.to_numpy(np.float64),
        np.array([index[n] for n in detections["class_name"]], dtype=np.int64),
        detections["score"].to_numpy(np.float64),
        names,
        iou=iou,
        score=score,
    )
    return Evaluation(iou, score, metric.to_string(), overall, per_class)
