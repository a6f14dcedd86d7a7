"""What each scorer actor asks Ray for: pure, so the requests can be checked without a cluster.

An engine with tensor-parallel size 1 is one actor holding one GPU. A larger engine follows Ray
Data's own vLLM stage (ray.llm, Ray 2.60): the actor asks for no GPU itself, sits in a placement
group with one GPU bundle per rank, and vLLM's Ray executor starts one worker per rank in that
group's bundles. Ray's stage packs the group with PACK, which lets ranks spill onto a second node;
tensor parallelism across nodes is slow without a fast interconnect, so the group here is
STRICT_PACK: an engine waits for one node with all its GPUs free rather than straddle two.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

from ..config import JobError, RunConfig

PLACEMENT_STRATEGY = "STRICT_PACK"
# Building prompts is light next to generation and needs less than a core. A request unlike the
# engine actors' also keeps Ray from fusing prompt building into them, where it would hold up
# the engine.
PREPARE_CPUS = 0.5

log = logging.getLogger(__name__)


class ResourcesUnavailable(JobError):
    """The engines and the prepare tasks cannot be placed on the cluster."""


def uses_gpus(device: str, cluster_gpus: float) -> bool:
    """`auto` uses GPUs when the cluster has any; `gpu` and `cpu` force the choice."""
    return device == "gpu" or (device == "auto" and cluster_gpus > 0)


def describe_resources(resources: dict[str, float]) -> str:
    shown = {name: resources.get(name, 0) for name in ("CPU", "GPU")}
    return ", ".join(f"{amount:g} {name}" for name, amount in shown.items())


def run_needs(run: RunConfig, tensor_parallel_size: int, gpus: bool) -> dict[str, float]:
    """What the smallest pool of engines plus one prepare task hold at once. The engines commit
    their own batches, so there are no write tasks beside them."""
    engines = smallest_pool(run)
    return {
        "CPU": engines * run.cpus_per_engine + PREPARE_CPUS,
        "GPU": engines * tensor_parallel_size if gpus else 0,
    }


def smallest_pool(run: RunConfig) -> int:
    size = actor_pool_size(run)
    return size.get("min_size", size.get("size"))


def placement_bundles(run: RunConfig, tensor_parallel_size: int, gpus: bool) -> list[dict[str, float]]:
    """The run's smallest pool as placement-group bundles: one per engine (its GPUs on one node,
    as the engine's own group will need), and one for a prepare task."""
    engine = {"CPU": run.cpus_per_engine, "GPU": tensor_parallel_size if gpus else 0}
    engine = {name: amount for name, amount in engine.items() if amount}
    engines = [engine] * smallest_pool(run) if engine else []
    return engines + [{"CPU": PREPARE_CPUS}]


def shortfall(needs: dict[str, float], cluster: dict[str, float]) -> list[str]:
    """Each resource the run needs more of than the cluster has."""
    return [name for name, amount in needs.items() if amount > cluster.get(name, 0)]


def pool_description(run: RunConfig, tensor_parallel_size: int, gpus: bool) -> str:
    size = actor_pool_size(run)
    engines = size.get("size") or f"at least {size['min_size']}"
    per_engine = f"{run.cpus_per_engine:g} CPU" + (f" and {tensor_parallel_size} GPU" if gpus else "")
    return f"{engines} engine(s) of {per_engine} each, plus {PREPARE_CPUS:g} CPU to build prompts"


def check_placement(run: RunConfig, tensor_parallel_size: int, gpus: bool, own_cluster: bool) -> None:
    """Refuse a run whose engines cannot be placed, before any engine starts.

    A Ray of the run's own cannot grow: a pool larger than it is refused at once. A cluster that
    was joined may autoscale, so a placement group of the same shape is requested and given
    `placement_timeout` seconds to be placed, then removed for the pool to take its place.
    """
    import ray

    needs = run_needs(run, tensor_parallel_size, gpus)
    cluster = ray.cluster_resources()
    missing = shortfall(needs, cluster)
    pool = pool_description(run, tensor_parallel_size, gpus)
    if missing and own_cluster:
        raise ResourcesUnavailable(
            f"the run needs {describe_resources(needs)} ({pool}); this machine's Ray has "
            f"{describe_resources(cluster)}: lower --engines or --cpus-per-engine, or choose --device"
        )
    if missing:
        log.warning("waiting up to %.0f s for the cluster to grow: the run needs %s, it has %s",
                    run.placement_timeout, describe_resources(needs), describe_resources(cluster))
    group = ray.util.placement_group(placement_bundles(run, tensor_parallel_size, gpus), strategy="PACK")
    try:
        if not group.wait(timeout_seconds=run.placement_timeout):
            raise ResourcesUnavailable(
                f"the engines could not be placed within {run.placement_timeout:g} s (--placement-timeout): the run "
                f"needs {describe_resources(needs)} ({pool}); the cluster has {describe_resources(cluster)}, "
                f"{describe_resources(ray.available_resources())} of it free"
            )
    finally:
        ray.util.remove_placement_group(group)


def actor_pool_size(run: RunConfig) -> dict[str, int]:
    """Arguments of `ray.data.ActorPoolStrategy`: a fixed number of engines, or autoscaling bounds."""
    if run.min_engines is not None or run.max_engines is not None:
        low = run.min_engines or 1
        return {"min_size": low, "max_size": run.max_engines or low}
    return {"size": run.engines or 1}


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
