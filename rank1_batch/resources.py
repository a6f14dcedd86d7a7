"""What each scorer actor asks Ray for: pure, so the requests can be checked without a cluster."""

from __future__ import annotations

from typing import Any

from .config import RunConfig


def uses_gpus(device: str, cluster_gpus: float) -> bool:
    """`auto` uses GPUs when the cluster has any; `gpu` and `cpu` force the choice."""
    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"--device {device!r}: expected auto, gpu or cpu")
    return device == "gpu" or (device == "auto" and cluster_gpus > 0)


def actor_pool_size(run: RunConfig) -> dict[str, int]:
    """Arguments of `ray.data.ActorPoolStrategy`: a fixed number of engines, or autoscaling bounds."""
    if run.min_engines is not None or run.max_engines is not None:
        low = run.min_engines or 1
        high = run.max_engines or low
        if low > high:
            raise ValueError(f"--min-engines {low} is more than --max-engines {high}")
        return {"min_size": low, "max_size": high}
    if not run.engines or run.engines < 1:
        raise ValueError("--engines must be at least 1")
    return {"size": run.engines}


def engine_resources(tensor_parallel_size: int, cpus_per_engine: float, gpus: bool) -> dict[str, Any]:
    """Ray resources of one scorer actor: one GPU per tensor-parallel rank, or none on the CPU build."""
    return {"num_cpus": cpus_per_engine, "num_gpus": tensor_parallel_size if gpus else 0}
