"""Starting or joining Ray, with the settings every run needs, and what a run may ask of it."""

from __future__ import annotations

import logging
import os

import ray

from pipeline.errors import ClusterTooSmallError

# glibc returns freed arenas to the OS after every forward pass and maps them back on the
# next; these keep them (measured: 75.0 s → 53.6 s for a tile loop, ~200 MB more peak).
ALLOCATOR_ENV = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "8000000000",
    "MALLOC_TOP_PAD_": "1000000000",
}

# Ray deletes dead objects from the object store in batches, once a second by default. Tiles
# stream through it at 100+ MB/s, so a second's worth lingered: 290 MB of store pages in use
# while 13 MB of objects were alive, and a 32k x 32k scene peaked at 1.29x the memory of a 4k
# one. Every 100 ms keeps that to a tenth. Clusters set it on every node as
# RAY_free_objects_period_milliseconds (infra/Dockerfile: KubeRay and the launcher run it).
# Ray also kills a worker process idle for a second once there are more than CPUs, and a new
# one takes ~2 CPU-s to start (torch, rasterio): the plan, read and merge tasks of an archive
# of small scenes kept 150 of them coming and going (2,000 one-tile scenes: 161 s -> 115 s
# with a minute's grace). Clusters: RAY_idle_worker_killing_time_threshold_ms.
RAY_SYSTEM_CONFIG = {
    "free_objects_period_milliseconds": 100,
    "idle_worker_killing_time_threshold_ms": 60_000,
}


def ensure_ray(address: str | None = None, log_to_driver: bool = False) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), else start Ray embedded in this process.

    ``log_to_driver`` shows workers' prints (training progress); jobs keep them quiet.
    """
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target == "local":
        start_embedded_ray(log_to_driver=log_to_driver)
        return
    ray.init(
        address=target,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        logging_level=logging.WARNING,
    )


def start_embedded_ray(num_cpus: int | None = None, log_to_driver: bool = False) -> None:
    """A fresh single-node Ray in this process, with the object store settings jobs need."""
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=log_to_driver,
        logging_level=logging.WARNING,
        _system_config=dict(RAY_SYSTEM_CONFIG),  # a copy: ray.init adds its own keys to it
    )


def check_layout_fits(
    num_actors: int, cpus_per_actor: float, gpus_per_actor: float, task_cpus: float
) -> None:
    """Refuse a layout whose stages cannot all be scheduled on the cluster as it is now.

    Detector actors are placed first and hold their CPUs for the whole run; if they leave
    less than ``task_cpus`` (the largest task a tile passes through) free, that task can
    never start and the run would wait forever.
    """
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    actor_cpus = num_actors * cpus_per_actor
    if gpus_per_actor > 0 and num_actors * gpus_per_actor > gpus > 0:
        raise ClusterTooSmallError(
            f"detect.num_actors x detect.num_gpus_per_actor = {num_actors * gpus_per_actor:g} "
            f"GPUs, but the cluster has {gpus:g}: lower detect.num_actors"
        )
    if cpus and actor_cpus + task_cpus > cpus:
        fits = max(0.0, (cpus - task_cpus) / num_actors)
        raise ClusterTooSmallError(
            f"detect.num_actors x detect.num_cpus_per_actor = {actor_cpus:g} CPUs leaves less "
            f"than the {task_cpus:g} CPU the tile stages' tasks need on this cluster's "
            f"{cpus:g}: the actors would wait for tiles that no task could make. Lower "
            f"detect.num_actors, "
            f"or set detect.num_cpus_per_actor to at most {fits:.2f}"
        )


def check_object_store(num_actors: int, inflight_mb_per_actor: int) -> None:
    """Fail before any read when the tiles in flight cannot fit the cluster's object store."""
    budget = num_actors * inflight_mb_per_actor * 2**20
    capacity = ray.cluster_resources().get("object_store_memory", 0.0)
    if capacity and budget > capacity:
        raise ClusterTooSmallError(
            f"detect.num_actors x detect.inflight_mb_per_actor = {budget / 2**20:.0f} MB of "
            f"tiles in flight, more than the cluster's object store ({capacity / 2**20:.0f} MB):"
            " lower detect.inflight_mb_per_actor or tiling.tile_size"
        )
