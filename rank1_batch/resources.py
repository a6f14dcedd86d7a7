"""What each scorer actor asks Ray for: pure, so the requests can be checked without a cluster.

An engine with tensor-parallel size 1 is one actor holding one GPU. A larger engine follows Ray
Data's own vLLM stage (ray.llm, Ray 2.60): the actor asks for no GPU itself, sits in a placement
group with one GPU bundle per rank, and vLLM's Ray executor starts one worker per rank in that
group's bundles. Ray's stage packs the group with PACK, which lets ranks spill onto a second node;
tensor parallelism across nodes is slow without a fast interconnect, so the group here is
STRICT_PACK: an engine waits for one node with all its GPUs free rather than straddle two.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .config import RunConfig

PLACEMENT_STRATEGY = "STRICT_PACK"


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


def engine_bundles(tensor_parallel_size: int, cpus_per_engine: float) -> list[dict[str, float]]:
    """Placement-group bundles of one multi-GPU engine: one GPU per rank (vLLM's Ray executor puts
    one worker in each GPU bundle); the actor's own CPUs go in the first bundle, so the actor lands
    on the node of rank 0, as vLLM requires of its driver."""
    first = {"CPU": cpus_per_engine, "GPU": 1} if cpus_per_engine else {"GPU": 1}
    return [first] + [{"GPU": 1} for _ in range(tensor_parallel_size - 1)]


def engine_placement(bundles: list[dict[str, float]]) -> dict[str, Any]:
    """Ray remote arguments that start one engine actor in a placement group of its own.

    Ray Data calls this in the driver before it starts each actor of the pool. Capturing child
    tasks keeps vLLM's workers, which the actor starts, inside the group.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.placement_group(bundles, strategy=PLACEMENT_STRATEGY)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)}


def engine_resources(tensor_parallel_size: int, cpus_per_engine: float, gpus: bool) -> dict[str, Any]:
    """`Dataset.map_batches` resource arguments of the scorer actors.

    No GPUs: CPUs only (a CPU build runs any tensor-parallel size inside the actor). One GPU per
    engine: the actor holds it. More: a placement group per actor, made when Ray Data starts the
    actor (`ray_remote_args_fn`; Ray 2.60 marks it deprecated, to go in 2.64, and offers nothing
    else that gives each actor of a pool its own group; ray.llm's vLLM stage uses it too).
    """
    if tensor_parallel_size < 1:
        raise ValueError("--tensor-parallel-size must be at least 1")
    if not gpus:
        return {"num_cpus": cpus_per_engine, "num_gpus": 0}
    if tensor_parallel_size == 1:
        return {"num_cpus": cpus_per_engine, "num_gpus": 1}
    return {
        "num_cpus": cpus_per_engine,
        "num_gpus": 0,
        "ray_remote_args_fn": partial(engine_placement, engine_bundles(tensor_parallel_size, cpus_per_engine)),
    }


def engine_overrides(tensor_parallel_size: int, gpus: bool) -> dict[str, Any]:
    """vLLM engine arguments that the placement above needs.

    A multi-GPU engine must use vLLM's Ray executor, which finds the actor's placement group and
    fills it. Set explicitly, as ray.llm's stage does: left to choose, vLLM 0.32 first counts the
    GPUs the actor process sees, which holds none (Ray hides none from it, or all of them under
    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1, and then vLLM refuses the tensor-parallel size).
    """
    return {"distributed_executor_backend": "ray"} if gpus and tensor_parallel_size > 1 else {}
