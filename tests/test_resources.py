"""What a scorer actor asks Ray for, by device and tensor-parallel size."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from rank1_batch.config import RunConfig
from rank1_batch.cluster.resources import (
    PLACEMENT_STRATEGY,
    actor_pool_size,
    engine_bundles,
    engine_overrides,
    engine_placement,
    engine_resources,
    placement_bundles,
    run_needs,
    shortfall,
    uses_gpus,
)


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_cpu_only_engines_ask_for_cpus_only(tensor_parallel_size):
    assert engine_resources(tensor_parallel_size, 2.0, gpus=False) == {"num_cpus": 2.0, "num_gpus": 0}
    assert engine_overrides(tensor_parallel_size, gpus=False) == {}


def test_single_gpu_engine_holds_its_gpu():
    assert engine_resources(1, 4, gpus=True) == {"num_cpus": 4, "num_gpus": 1}
    assert engine_overrides(1, gpus=True) == {}


def test_multi_gpu_engine_gets_a_placement_group_on_one_node():
    resources = engine_resources(2, 4, gpus=True)
    # The actor holds no GPU: vLLM's workers take them from the group's bundles.
    assert resources["num_gpus"] == 0 and resources["num_cpus"] == 4
    make_placement = resources["ray_remote_args_fn"]
    assert make_placement.func is engine_placement
    assert make_placement.args == ([{"CPU": 4, "GPU": 1}, {"GPU": 1}],)
    assert PLACEMENT_STRATEGY == "STRICT_PACK"
    pickle.dumps(make_placement)  # Ray Data may ship the plan
    assert engine_overrides(2, gpus=True) == {"distributed_executor_backend": "ray"}


@pytest.mark.parametrize("tensor_parallel_size", [1, 2, 4, 8])
def test_bundles_hold_one_gpu_per_rank_and_the_actor_cpus_once(tensor_parallel_size):
    bundles = engine_bundles(tensor_parallel_size, 3)
    assert len(bundles) == tensor_parallel_size
    assert all(bundle["GPU"] == 1 for bundle in bundles)  # vLLM rejects bundles with more
    assert sum(bundle.get("CPU", 0) for bundle in bundles) == 3 == bundles[0]["CPU"]


def test_bundles_without_cpus_ask_for_none():
    assert engine_bundles(2, 0) == [{"GPU": 1}, {"GPU": 1}]


def test_tensor_parallel_size_below_one_is_refused():
    with pytest.raises(ValueError, match="tensor-parallel-size"):
        engine_resources(0, 1, gpus=True)


def test_placement_group_is_made_by_ray(ray_session):
    """The function Ray Data calls before starting each actor, on a real (GPU-less) Ray: the group
    stays pending there, which is enough to read back what was asked."""
    import ray
    from ray.util.placement_group import placement_group_table, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    strategy = engine_resources(2, 1, gpus=True)["ray_remote_args_fn"]()["scheduling_strategy"]
    try:
        assert isinstance(strategy, PlacementGroupSchedulingStrategy)
        assert strategy.placement_group_capture_child_tasks
        table = placement_group_table(strategy.placement_group)
        assert table["strategy"] == "STRICT_PACK"
        assert list(table["bundles"].values()) == [{"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}]
    finally:
        remove_placement_group(strategy.placement_group)
    assert ray.is_initialized()


# A Ray Data pool of one multi-GPU engine on a Ray with 2 logical GPUs (Ray does not check them
# against hardware): the actor holds none, and the tasks it starts with one GPU each, as vLLM's Ray
# executor starts its workers, run inside the actor's group on GPUs 0 and 1.
MULTI_GPU_POOL = """
import json, time, ray, ray.data
from ray.util import get_current_placement_group
from rank1_batch.cluster.resources import engine_resources

@ray.remote(num_cpus=0, num_gpus=1)
def rank():
    time.sleep(3)  # both ranks hold their GPU at once, as vLLM's workers do
    return ray.get_gpu_ids()

class Engine:
    def __init__(self):
        self.seen = {"bundles": get_current_placement_group().bundle_specs, "actor_gpus": ray.get_gpu_ids(),
                     "rank_gpus": sorted(ray.get([rank.remote() for _ in range(2)], timeout=120))}
    def __call__(self, batch):
        return {"seen": [json.dumps(self.seen)] * len(batch["id"])}

ray.init(num_cpus=2, num_gpus=2, include_dashboard=False)
pool = ray.data.range(2).map_batches(
    Engine, compute=ray.data.ActorPoolStrategy(size=1), batch_size=2, **engine_resources(2, 1, gpus=True)
)
print(pool.take_all()[0]["seen"])
"""


@pytest.mark.own_processes
def test_multi_gpu_engine_workers_run_in_the_engine_placement_group():
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    finished = subprocess.run([sys.executable, "-c", MULTI_GPU_POOL], env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    seen = json.loads(finished.stdout.strip().splitlines()[-1])
    assert seen == {"bundles": [{"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}], "actor_gpus": [], "rank_gpus": [[0], [1]]}


@pytest.mark.parametrize(
    "device, cluster_gpus, expected",
    [("auto", 0, False), ("auto", 4, True), ("gpu", 0, True), ("cpu", 4, False)],
)
def test_device_choice(device, cluster_gpus, expected):
    assert uses_gpus(device, cluster_gpus) is expected


def test_actor_pool_is_fixed_or_autoscaling():
    assert actor_pool_size(RunConfig()) == {"size": 1}
    assert actor_pool_size(RunConfig(engines=3)) == {"size": 3}
    assert actor_pool_size(RunConfig(min_engines=1, max_engines=8)) == {"min_size": 1, "max_size": 8}
    assert actor_pool_size(RunConfig(max_engines=4)) == {"min_size": 1, "max_size": 4}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_engines": 4, "max_engines": 2}, "--min-engines 4 is more than --max-engines 2"),
        ({"engines": 2, "min_engines": 1}, "not both"),
        ({"min_engines": 0}, "--min-engines must be at least 1"),
        ({"engines": 0}, "--engines must be at least 1"),
        ({"device": "tpu"}, "--device 'tpu'"),
        ({"max_failed_share": 1.5}, "--max-failed-share"),
    ],
)
def test_contradictory_pool_and_device_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**options)


def test_run_needs_the_smallest_pool_and_a_prepare_task():
    assert run_needs(RunConfig(engines=2), 1, gpus=False) == {"CPU": 2.5, "GPU": 0}
    assert run_needs(RunConfig(min_engines=2, max_engines=8, cpus_per_engine=4), 2, gpus=True) == {"CPU": 8.5, "GPU": 4}
    assert shortfall({"CPU": 2.5, "GPU": 0}, {"CPU": 2.0}) == ["CPU"]
    assert shortfall({"CPU": 1.5, "GPU": 1}, {"CPU": 2.0}) == ["GPU"]
    assert placement_bundles(RunConfig(engines=2, cpus_per_engine=4), 2, gpus=True) == [
        {"CPU": 4, "GPU": 2}, {"CPU": 4, "GPU": 2}, {"CPU": 0.5}]
