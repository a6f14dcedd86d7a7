"""Shared, expensive fixtures: one vLLM engine and one Ray per test session, and the marks that
tell the tests of pure logic (`make test-quick`) from those that start real components."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

import pyarrow as pa
import pyarrow.parquet as pq

from rank1_batch.config import TINY_CROSS_ENCODER_DIR, EngineConfig, JobConfig

ROOT = Path(__file__).resolve().parent.parent

# Fixtures that start a real component: a test that uses one, directly or through another
# fixture, is an integration test. Tests that start one without such a fixture are marked so.
REAL_COMPONENTS = {"ray_session", "scorer", "cross_encoder", "s3_endpoint"}
# Module fixtures that start Ray or a run in processes of their own.
OWN_PROCESSES = {"finished_demo", "ray_head"}
# Session fixtures that each start a blocking engine, about half a minute of a worker's CPU: the
# modules that use one share a pytest-xdist group, so that only one worker starts it.
SESSION_ENGINES = ("scorer", "cross_encoder")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    # A module's group: the first session engine any of its tests uses, else the module itself.
    engine_of: dict[str, str] = {}
    for item in items:
        used = [engine for engine in SESSION_ENGINES if engine in item.fixturenames]
        if used:
            engine_of.setdefault(item.module.__name__, used[0])
    for item in items:
        fixtures = set(item.fixturenames)
        if OWN_PROCESSES & fixtures:
            item.add_marker(pytest.mark.own_processes)
        if REAL_COMPONENTS & fixtures or item.get_closest_marker("own_processes"):
            item.add_marker(pytest.mark.integration)
        # `make test` runs two pytest-xdist workers with --dist loadgroup: a module's tests share a
        # worker, and so build its module fixtures once; a test that runs processes of its own and
        # shares no fixture with its module goes to whichever worker is free.
        alone = item.get_closest_marker("own_processes") and not OWN_PROCESSES & fixtures
        module = item.module.__name__
        item.add_marker(pytest.mark.xdist_group(item.nodeid if alone else engine_of.get(module, module)))
    # Groups are handed out in the order of their first test, longest work first, so that the
    # workers finish together rather than one running a kill-and-restart test alone at the end:
    # the lone tests (kills and restarts of whole runs), then modules that start Ray or runs of
    # their own, then the other integration tests (those with more tests on Ray, which mostly run
    # whole jobs, first), then pure logic.
    tiers: dict[str, int] = {}
    on_ray: dict[str, int] = {}
    for item in items:
        group = item.get_closest_marker("xdist_group").args[0]
        tier = (0 if group == item.nodeid else 1 if item.get_closest_marker("own_processes")
                else 2 if item.get_closest_marker("integration") else 3)
        tiers[group] = min(tier, tiers.get(group, tier))
        on_ray[group] = on_ray.get(group, 0) + ("ray_session" in item.fixturenames)
    items.sort(key=lambda item: (tiers[group := item.get_closest_marker("xdist_group").args[0]], -on_ray[group]))


def pytest_configure(config):
    # pytest-xdist otherwise hands out the groups with the most tests first, which puts the lone
    # tests, the longest, last.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


# The engine's worker in its engine core's process, as vLLM runs a one-device GPU engine, rather than
# in a process of its own, as the CPU build does by default to set OpenMP up: one Python process
# fewer to spawn and import vLLM into at each engine start, about a third of it. Ray's workers and
# the runs started as processes inherit it; the engine-kill test keeps the CPU build's own layout,
# and the blocking engines below theirs (see `blocking_engine`).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# The smallest KV cache a CPU build takes (GiB), for every engine of the session: the tiny model's
# sequences need far less, and each engine start allocates it whole.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# vLLM's few `torch.compile`d sampling ops (the label pass's logprobs among them) run eagerly: on a
# CPU each engine start otherwise pays inductor's ISA probes and C++ header hashing, about 2 s, for
# the same numbers (the fidelity tests hold the scores to the reference's either way).
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# The tiny model's settings in every integration test: eager mode starts in seconds on a CPU.
TINY_ENGINE = EngineConfig(
    model="tiny", dtype="bfloat16", max_model_len=1024, max_reasoning_tokens=128, enforce_eager=True
)


def tiny_model_builder():
    """The script that built the tiny model: its synthetic pairs are the model's own domain."""
    spec = importlib.util.spec_from_file_location("build_tiny_model", ROOT / "scripts" / "build_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def candidate_lists(queries: int, per_query: int, seed: int) -> pa.Table:
    """Input rows: queries of the tiny model's world with candidates, from the demo's builder."""
    spec = importlib.util.spec_from_file_location("build_sample", ROOT / "scripts" / "build_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.candidate_lists(queries, per_query, seed)


def write_shards(table: pa.Table, directory: Path, shards: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    size = -(-table.num_rows // shards)
    for shard in range(shards):
        pq.write_table(table.slice(shard * size, size), directory / f"pairs-{shard}.parquet")


def tiny_job(**options) -> JobConfig:
    engine = {key: value for key, value in vars(TINY_ENGINE).items() if key != "engine_args"}
    return JobConfig.from_options({**engine, "max_reasoning_tokens": 64, "batch_size": 64, **options})


def tiny_run_options(**options) -> list[str]:
    """The same job on the command line."""
    given = {**{k: v for k, v in vars(TINY_ENGINE).items() if k != "engine_args"}, "max_reasoning_tokens": 64, **options}
    arguments = []
    for key, value in given.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif value not in (None, False):
            arguments += [flag, str(value)]
    return arguments


def command_line(process) -> str:
    """A `psutil.Process`'s command line; empty for one that has ended since it was listed (Ray's
    short-lived workers do)."""
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def read_dir(path) -> pa.Table:
    return pq.read_table(str(path))


def pair_keys(table: pa.Table) -> list[tuple[str, str]]:
    return sorted(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist()))


@pytest.fixture(scope="session")
def synthetic():
    return tiny_model_builder()


def blocking_engine(start):
    """`start()`, a blocking `vllm.LLM`'s scorer, with its engine core in a process of its own: with
    the variable above at 0, the core would run in the test process, whose shutdown hangs in ZeroMQ
    at the session's end."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        return start()


@pytest.fixture(scope="session")
def scorer():
    from rank1_batch.model.scorer import Rank1Scorer

    return blocking_engine(lambda: Rank1Scorer(TINY_ENGINE))


@pytest.fixture(scope="session")
def cross_encoder():
    """The bundled cross-encoder on one pooling engine; `with_template` reuses it. float32, so its
    scores can be held to transformers' within 1e-4."""
    from rank1_batch.model.cross_encoder import CrossEncoderScorer

    engine = EngineConfig(model=str(TINY_CROSS_ENCODER_DIR), dtype="float32", max_model_len=256, enforce_eager=True)
    return blocking_engine(lambda: CrossEncoderScorer(engine))


# Credentials of the test S3 server only; s3fs and the Ray workers read them from the environment.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "rank1-test-key", "AWS_SECRET_ACCESS_KEY": "rank1-test-secret-7f3a",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server on 127.0.0.1, started for this session and stopped after it."""
    os.environ.update(S3_TEST_ENV)
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:  # any answer means the server is up
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the session, started after the S3 credentials are in the environment
    so that its workers inherit them; yields its session directory (its logs are there)."""
    import ray

    # "local": a Ray of the session's own, never a cluster some `ray start` left recorded.
    context = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield context.address_info["session_dir"]
    ray.shutdown()
