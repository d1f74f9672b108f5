"""Run progress and the run report's derived numbers and human summary. Pure: no Ray.

The summary is computed from the report's dict (what ``_runs/<run_id>.json`` holds), so the
same lines can be printed for a run that finished on a cluster.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyproj import CRS, Geod, Transformer

_GEOD = Geod(ellps="WGS84")


def footprint_km2(
    width: int, height: int, transform: tuple[float, ...], crs_wkt: str | None, per_side: int = 16
) -> float:
    """Geodesic area of a raster's footprint (its pixel grid's outline, densified), in km².

    Any CRS: the outline goes to longitude/latitude and the area is taken on the ellipsoid,
    so UTM metres, degrees and rotated grids all count alike. 0.0 when it cannot be mapped.
    """
    if crs_wkt is None:
        return 0.0
    a, b, c, d, e, f = transform[:6]
    steps = np.linspace(0.0, 1.0, per_side, endpoint=False)
    cols = np.concatenate(
        [steps * width, np.full(per_side, width), (1 - steps) * width, np.zeros(per_side)]
    )
    rows = np.concatenate(
        [np.zeros(per_side), steps * height, np.full(per_side, height), (1 - steps) * height]
    )
    xs, ys = a * cols + b * rows + c, d * cols + e * rows + f
    try:
        to_lonlat = Transformer.from_crs(CRS.from_wkt(crs_wkt), "EPSG:4326", always_xy=True)
        lons, lats = to_lonlat.transform(xs, ys)
    except Exception:  # noqa: BLE001 - the area is informative; a scene is never failed for it
        return 0.0
    if not (np.all(np.isfinite(lons)) and np.all(np.isfinite(lats))):
        return 0.0
    area, _ = _GEOD.polygon_area_perimeter(lons, lats)
    return abs(area) / 1e6


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s``; ``?`` when unknown."""
    if seconds is None or not np.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@dataclass(frozen=True)
class RunProgress:
    """Where a run stands: what ``run_job`` hands its ``on_progress`` callback.

    Scenes and tiles are counted as they are discovered and planned, so both totals can grow
    until ``discovery_finished``; ``busy_s`` is the run's time less Ray's own start.
    """

    scenes_done: int
    scenes_failed: int
    scenes_skipped: int
    scenes_known: int  # discovered so far, skipped ones included
    discovery_finished: bool
    tiles_done: int
    tiles_planned: int  # planned so far
    busy_s: float

    @property
    def scenes_through(self) -> int:
        return self.scenes_done + self.scenes_failed + self.scenes_skipped

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_done / self.busy_s if self.busy_s > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at the current rate; a lower bound while discovery goes on."""
        rate = self.tiles_per_s
        return (self.tiles_planned - self.tiles_done) / rate if rate > 0 else None

    def eta_text(self) -> str:
        more = "" if self.discovery_finished else ">"
        eta = self.eta_s()
        return more + format_duration(eta) if eta is not None else "?"

    def scenes_text(self) -> str:
        """``scenes 3/10`` (``3/10+`` while more may be found), with skips and failures."""
        more = "" if self.discovery_finished else "+"
        text = f"scenes {self.scenes_through}/{self.scenes_known}{more}"
        extra = [
            f"{count} {what}"
            for count, what in ((self.scenes_skipped, "skipped"), (self.scenes_failed, "failed"))
            if count
        ]
        return text + (f" ({', '.join(extra)})" if extra else "")

    def line(self) -> str:
        """``scenes 3/10 (1 failed), tiles 120/400 (30%), 2.10 tiles/s, ETA 2m13s``."""
        share = self.tiles_done / self.tiles_planned if self.tiles_planned else 1.0
        return (
            f"{self.scenes_text()}, tiles {self.tiles_done}/{self.tiles_planned} "
            f"({share:.0%}), {self.tiles_per_s:.2f} tiles/s, ETA {self.eta_text()}"
        )


_SCENE_PREFIX = re.compile(r"^scene \S+: ")


def failure_reason(error: str | None) -> str:
    """An error without its scene and details, to group failures: 'read failed'."""
    text = _SCENE_PREFIX.sub("", error or "unknown error")
    return re.split(r"[:(]", text, maxsplit=1)[0].strip() or text


def run_totals(scenes: Iterable[dict[str, Any]], busy_s: float) -> dict[str, Any]:
    """Counts per status, failures by reason, detections per class, area and its rate.

    One pass over ``scenes``: a run's scene log is read from disk, never held.
    """
    status: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    per_class: Counter[str] = Counter()
    area = 0.0
    for scene in scenes:
        status[scene["status"]] += 1
        if scene["status"] == "failed":
            failures[failure_reason(scene.get("error"))] += 1
        elif scene["status"] == "done":
            per_class.update(scene.get("per_class") or {})
            area += float(scene.get("area_km2") or 0.0)
    return {
        "scenes_done": status["done"],
        "scenes_skipped": status["skipped"],
        "scenes_failed": status["failed"],
        "failures_by_reason": dict(failures),
        "detections_per_class": dict(sorted(per_class.items())),
        "area_km2": area,
        "km2_per_hour": area / busy_s * 3600 if busy_s > 0 else 0.0,
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The human summary of a run report (its JSON dict)."""
    per_class = report.get("detections_per_class") or {}
    classes = ", ".join(f"{name} {count}" for name, count in per_class.items())
    lines = [
        f"run {report['run_id']} ({report['job']}, model {report['model_id']})",
        f"scenes: {report['scenes_done']} done, {report['scenes_skipped']} skipped, "
        f"{report['scenes_failed']} failed",
        f"tiles: {report['tiles']}",
        f"detections: {report['detections']}" + (f" ({classes})" if classes else ""),
        f"tiles_per_s: {report['tiles_per_s']:.2f}",
        f"area: {report['area_km2']:.2f} km², {report['km2_per_hour']:.1f} km²/h",
        f"wall_s: {report['wall_s']:.1f} (of which starting Ray: {report['ray_start_s']:.1f}), "
        f"{format_duration(report['wall_s'])}",
        f"output: {report['output']}",
    ]
    for reason, count in (report.get("failures_by_reason") or {}).items():
        lines.append(f"  {count} failed: {reason}")
    for scene in report["scenes"]:
        if scene["status"] == "failed":
            lines.append(f"  FAILED {scene['scene_id']}: {scene['error']}")
    return lines
