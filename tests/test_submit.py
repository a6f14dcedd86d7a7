"""Jobs on a Ray cluster: the command line a job runs, its runtime env, a real submission to a Ray
head started here, next to the session's in-process Ray, and a worker node lost mid-run."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import click
import psutil
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from rank1_batch.cli import SAMPLE, job_config, main, run
from rank1_batch.config import EngineConfig, JobConfig, RunConfig, ScoringConfig
from rank1_batch.cluster.submit import WORKING_DIR_EXCLUDES, entrypoint, for_cluster, runtime_env

from .conftest import ROOT, candidate_lists, command_line, pair_keys, read_dir, tiny_run_options, write_shards

VENV_BIN = Path(sys.executable).parent
TINY_OPTIONS = ["--model", "tiny", "--dtype", "bfloat16", "--max-model-len", "1024",
                "--max-reasoning-tokens", "64", "--enforce-eager"]


def parse_run(line: str) -> JobConfig:
    """The job that `rank1-batch run` makes of a command line, parsed as the cluster will."""
    words = shlex.split(line)
    assert words[:2] == ["rank1-batch", "run"]
    params = dict(run.make_context("run", words[2:]).params)
    return job_config(params.pop("config_path"), params)


def every_option_changed() -> JobConfig:
    """A job whose every option differs from its default (every flag flipped; --engines, which
    excludes --min-engines/--max-engines, aside), with values that need quoting."""
    flipped = {
        f.name: not f.default
        for part in (EngineConfig, ScoringConfig, RunConfig)
        for f in dataclasses.fields(part)
        if f.type == "bool"
    }
    return JobConfig.from_options(
        {
            **flipped,
            "model": "org/rank1 model", "revision": "abc123", "dtype": "float16", "max_model_len": 4096,
            "max_reasoning_tokens": 100, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.85,
            "quantization": "awq", "seed": 7, "samples": 5, "temperature": 0.7, "top_p": 0.95, "fit": "budget",
            "block_size": 16,
            "max_num_seqs": 64, "max_num_batched_tokens": 4096,
            "engine_args": {"kv_cache_dtype": "fp8", "limit_mm_per_prompt": {"image": 0}},
            "threshold": 0.25, "grades": [0.2, 0.5, 0.85], "aggregate": "mode", "task_template": "Find \"passages\" that answer: FILL_QUERY_HERE's $HOME",
            "input": ["s3://bucket/with space/", "/data/a.parquet"], "output": "s3://bucket/out/",
            "columns": {"text": "passage", "query_id": "qid"}, "top_k": 50, "run_tag": "tag;rm -rf", "store": "s3://bucket/score store/",
            "min_engines": 2, "max_engines": 5, "cpus_per_engine": 2.5, "device": "gpu",
            "batch_size": 64, "max_concurrent_batches": 3, "placement_timeout": 30.0, "stall_timeout": 900.0, "grace_period": 50.0, "lease_timeout": 300.0,
            "compact": True,
            "max_failed_share": 0.1, "s3_endpoint_url": "http://minio:9000", "s3_profile": "batch",
            "cascade_model": "org/cross encoder", "cascade_template": "rankllama", "cascade_top_k": 100,
            "cascade_dtype": "bfloat16", "cascade_max_model_len": 512,
        }
    )


def cross_encoder_job() -> JobConfig:
    """The options a Rank1 job cannot change: the scorer's kind and template."""
    return JobConfig.from_options({"input": ["in/"], "output": "out/", "model": "org/reranker", "scorer": "cross-encoder",
                                   "cross_encoder_template": "rankllama"})


def test_every_option_is_changed_but_the_pool_and_the_address():
    """Else a new option would be left out of the round trip below unnoticed (--engines excludes
    --min/--max-engines; a submitted job reaches its cluster through RAY_ADDRESS)."""
    defaults = JobConfig().options()
    changed = {name for job in (every_option_changed(), cross_encoder_job())
               for name, value in job.options().items() if value != defaults[name]}
    assert set(defaults) - changed == {"engines", "ray_address"}


@pytest.mark.parametrize("job", [every_option_changed(), cross_encoder_job()], ids=["rank1 with a cascade", "cross-encoder"])
def test_entrypoint_runs_the_same_job(job):
    assert parse_run(entrypoint(job)) == job


def test_entrypoint_of_defaults_runs_the_same_job():
    job = JobConfig.from_options({"input": ["in/"], "output": "out/"})
    assert parse_run(entrypoint(job)) == job


def test_every_job_option_reaches_the_entrypoint():
    """A job option without a `run` option would be lost on the way to the cluster."""
    assert set(JobConfig().options()) <= {option.name for option in run.params}


def test_entrypoint_quotes_for_the_shell():
    line = entrypoint(every_option_changed())
    assert "--run-tag 'tag;rm -rf'" in line
    assert "--input 's3://bucket/with space/'" in line


def test_job_spec_options_are_resolved_before_submission():
    given = {"input": ("s3://b/in/",), "output": "s3://b/out/", "top_k": 20}
    job = job_config(str(ROOT / "jobs" / "nightly_rerank.yaml"), given)
    line = entrypoint(job)
    assert "--config" not in line and "--model jhu-clsp/rank1-7b" in line and "--top-k 20" in line


def test_relative_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = for_cluster(JobConfig.from_options({"input": ["pairs/", "s3://b/in/"], "output": "out"}))
    assert job.run.input == (str(tmp_path / "pairs"), "s3://b/in/")
    assert job.run.output == str(tmp_path / "out")


def test_runtime_env_ships_a_checkout_without_environments(tmp_path):
    env = runtime_env({"excludes": ["data/"], "env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}}, str(tmp_path), None)
    assert env["working_dir"] == str(tmp_path)
    assert env["excludes"] == ["data/", *WORKING_DIR_EXCLUDES]
    assert env["env_vars"] == {"VLLM_LOGGING_LEVEL": "WARNING"}


def test_package_replaces_the_pip_packages():
    assert runtime_env({"pip": ["rank1-batch==0.0.9"]}, None, "rank1-batch==0.1.0")["pip"] == ["rank1-batch==0.1.0"]
    pip = runtime_env({"pip": {"packages": ["x"], "pip_check": False}}, None, "rank1-batch==0.1.0")["pip"]
    assert pip == {"packages": ["rank1-batch==0.1.0"], "pip_check": False}


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "AWS_ACCESS_KEY_ID"])
def test_credentials_in_the_runtime_env_are_refused(name):
    with pytest.raises(click.UsageError, match=name):
        runtime_env({"env_vars": {name: "x"}}, None, None)


@pytest.mark.parametrize(
    "extra, message",
    [(["--working-dir", ".", "--package", "rank1-batch==0.1.0"], "not both"),
     (["--ray-address", "auto"], "--ray-address"),
     ([], "--input and --output")],
)
def test_submit_refuses_before_contacting_a_cluster(extra, message):
    options = [] if message.startswith("--input") else ["--input", "in/", "--output", "out/"]
    result = CliRunner().invoke(main, ["submit", "--address", "http://127.0.0.1:9", *options, *extra])
    assert result.exit_code == 2 and message in result.output


# A Ray head of the test's own, beside the session's in-process Ray (`ray_session`), with token
# authentication on.
#
# Every port it listens on is chosen here, and its temp dir is its own, so the two clusters share
# nothing. It is stopped through its own `ray start --block` process and the processes under it
# (stop_node). `ray stop` is not used: in Ray 2.60 it has no way to name a cluster and kills every
# Ray process on the machine, the session's own Ray and other test runs' included.
#
# The commands that talk to it run as processes of their own, as a user runs them: this process
# holds the session Ray's token (Ray loads a token once per process), and their HOME is their own,
# so this machine's ~/.ray/auth_token neither leaks into them nor is touched.

# Ports of each node's Ray workers: outside Ray's default range (10002-19999) and Linux's ephemeral one.
HEAD_WORKER_PORTS = ("21000", "21999")
WORKER_NODE_WORKER_PORTS = ("22000", "22999")


@dataclasses.dataclass(frozen=True)
class Head:
    dashboard: str  # the Jobs API, for submit/status/logs/stop
    gcs: str  # for run --ray-address
    token: str


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_job_api(dashboard: str, agent: str, token: str, head: subprocess.Popen, log: Path) -> None:
    """Until the Jobs API answers and the head's dashboard agent, which runs the jobs, is up: the
    API turns a job away when the agent is not there within 10 s, as on a busy machine."""
    deadline = time.monotonic() + 120
    probes = [urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"}),
              urllib.request.Request(f"{agent}/api/healthz")]
    while True:
        try:
            for probe in probes:
                with urllib.request.urlopen(probe, timeout=2):
                    pass
            return
        except OSError as error:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no job API at {dashboard} ({error}):\n{log.read_text()[-3000:]}") from None
        time.sleep(1)


def stop_node(head: subprocess.Popen) -> None:
    """SIGKILL, by pid, to `ray start --block` and every process under it: daemons, Ray workers and
    vLLM's engine processes (most in process groups of their own). Nothing of a throwaway node is
    worth a graceful stop, and Ray 2.60's daemons take 15 s and more to act on SIGTERM; for a worker
    node this is also how a machine is lost."""
    if head.poll() is not None:
        return
    tree = psutil.Process(head.pid).children(recursive=True)
    for process in [psutil.Process(head.pid), *tree]:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    head.wait()
    psutil.wait_procs(tree, timeout=30)


def node_environment(token: str) -> dict:
    """A node runs `rank1-batch` from this environment, as a cluster node runs it from its image;
    RAY_ADDRESS of the session's Ray must not leak into it. The cluster's token is its own, in
    RAY_AUTH_TOKEN (jobs inherit it, as a cluster's nodes share theirs), never a file."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def start_node(ports: dict, worker_ports: tuple[str, str], token: str, *options: str) -> tuple[subprocess.Popen, Path]:
    """`ray start --block` of a node with 2 CPUs, every port its own, and a temp dir of its own
    (short: Ray's socket paths live under it, and a Unix socket path is at most 107 bytes)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="r1node-"))
    ports = {"--node-manager-port": free_port(), "--object-manager-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--metrics-export-port": free_port(), **ports}
    command = [
        str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *options,
        "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(512 * 2**20), "--temp-dir", str(temp_dir),
        "--min-worker-port", worker_ports[0], "--max-worker-port", worker_ports[1],
        *(word for name, port in ports.items() for word in (name, str(port))),
    ]
    with open(temp_dir / "ray-start.log", "wb") as out:
        return subprocess.Popen(command, env=node_environment(token), stdout=out, stderr=subprocess.STDOUT), temp_dir


@pytest.fixture(scope="module")
def ray_head(ray_session):
    token = secrets.token_hex(16)
    dashboard_port, gcs_port, agent_port = free_port(), free_port(), free_port()
    ports = {"--port": gcs_port, "--dashboard-port": dashboard_port, "--dashboard-agent-listen-port": agent_port,
             "--ray-client-server-port": free_port()}
    head, temp_dir = start_node(ports, HEAD_WORKER_PORTS, token, "--head", "--include-dashboard", "true",
                                "--dashboard-host", "127.0.0.1")
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    try:
        wait_for_job_api(dashboard, f"http://127.0.0.1:{agent_port}", token, head, temp_dir / "ray-start.log")
        yield Head(dashboard, f"127.0.0.1:{gcs_port}", token)
    finally:
        stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def client_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


def client_env(home: Path, **token) -> dict:
    """The environment of a command on the user's machine: no Ray address, no RAY_AUTH_MODE, and
    only the token given here (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) or in `home`."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_"))}
    return {**env, "HOME": str(home), **token}


def with_token_file(home: Path, token: str) -> Path:
    (home / ".ray").mkdir(exist_ok=True)
    (home / ".ray" / "auth_token").write_text(token + "\n")
    return home


def invoke(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`rank1-batch ARGS` as a command of its own."""
    return subprocess.run([str(VENV_BIN / "rank1-batch"), *args], env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def submitted(ray_head, client_home, tmp_path_factory):
    """The sample, submitted with the token in ~/.ray/auth_token, the file any local Ray leaves."""
    output = tmp_path_factory.mktemp("cluster") / "output"
    result = invoke(
        client_env(with_token_file(client_home, ray_head.token)),
        "submit", "--address", ray_head.dashboard, "--working-dir", str(ROOT), "--follow",
        "--job-id", "rank1-test-sample", "--input", str(SAMPLE), "--output", str(output), "--top-k", "3",
        *TINY_OPTIONS,
    )
    return result, output


def test_submitted_job_succeeds_and_writes_every_output(submitted):
    result, output = submitted
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == "rank1-test-sample"
    assert "24 pairs scored" in result.stdout  # the job's own summary line, from its logs
    assert "SUCCEEDED" in result.stderr
    # The sample: 8 queries of 20 candidates; the top 3 of each are scored, all 160 are ranked.
    manifest = json.loads((output / "_manifest.json").read_text())
    assert manifest["counts"]["input"] == 160
    assert manifest["counts"]["scored"] == 24 and manifest["counts"]["rejected"] == 0
    assert pq.read_table(output / "scores").num_rows == 24
    assert pq.read_table(output / "traces").num_rows == 24
    assert pq.read_table(output / "ranked").num_rows == 160


def test_status_logs_and_stop_of_a_finished_job(submitted, ray_head, tmp_path):
    """The token from each of the places Ray takes it from, with no file in HOME."""
    token_file = tmp_path / "token"
    token_file.write_text(ray_head.token)
    by_variable = client_env(tmp_path, RAY_AUTH_TOKEN=ray_head.token)
    by_path = client_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(token_file))
    assert invoke(by_variable, "status", "rank1-test-sample", "--address", ray_head.dashboard).stdout.startswith("SUCCEEDED")
    assert "24 pairs scored" in invoke(by_path, "logs", "rank1-test-sample", "--address", ray_head.dashboard).stdout
    stopped = invoke(by_variable, "stop", "rank1-test-sample", "--address", ray_head.dashboard)
    assert "is not running (SUCCEEDED)" in stopped.stdout


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1 and result.stdout == "", result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr.strip()


def test_submit_without_a_token_says_what_to_set(ray_head, tmp_path):
    result = invoke(client_env(tmp_path), "submit", "--address", ray_head.dashboard,
                    "--input", str(SAMPLE), "--output", str(tmp_path / "output"), *TINY_OPTIONS)
    assert one_error_line(result) == (
        f"Error: the Ray cluster at {ray_head.dashboard} requires an authentication token: set RAY_AUTH_TOKEN, "
        "or RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token"
    )


def test_a_wrong_token_is_named(ray_head, tmp_path):
    result = invoke(client_env(tmp_path, RAY_AUTH_TOKEN="not-the-token"), "status", "x", "--address", ray_head.dashboard)
    assert one_error_line(result) == f"Error: the Ray cluster at {ray_head.dashboard} refused the authentication token from RAY_AUTH_TOKEN"


def test_failed_job_exits_non_zero_with_its_status(ray_head, tmp_path):
    result = invoke(
        client_env(tmp_path, RAY_AUTH_TOKEN=ray_head.token), "submit", "--address", ray_head.dashboard, "--follow",
        "--input", str(tmp_path / "no-such-input"), "--output", str(tmp_path / "output"), *TINY_OPTIONS,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stderr and "no-such-input" in result.stdout + result.stderr


def test_run_without_a_token_says_what_to_set(ray_head, tmp_path):
    write_shards(candidate_lists(1, 2, seed=11), tmp_path / "pairs", 1)
    result = invoke(client_env(tmp_path), "run", "--ray-address", ray_head.gcs, "--input", str(tmp_path / "pairs"),
                    "--output", str(tmp_path / "output"), *tiny_run_options())
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: the Ray cluster at {ray_head.gcs} requires an authentication token: set RAY_AUTH_TOKEN, "
                      "or RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token"]
    assert "Traceback" not in result.stderr


# Holds every CPU of the head node until it is killed, so that the run's first engine must go to the
# worker node; its death frees them for the engine that replaces the lost one.
HOLD_THE_HEAD = """
import sys, time
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 120
while len([node for node in ray.nodes() if node["Alive"]]) < 2:
    if time.monotonic() > deadline:
        sys.exit("the worker node never joined")
    time.sleep(0.5)
head = next(node["NodeID"] for node in ray.nodes() if node["Alive"] and "node:__internal_head__" in node["Resources"])


@ray.remote(num_cpus=2)
class Holder:
    def ready(self):
        return True


holder = Holder.options(scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
ray.get(holder.ready.remote())
print("holding", flush=True)
time.sleep(3600)
"""


def test_a_lost_node_loses_no_pair(submitted, ray_head, client_home, tmp_path):
    """A worker node is lost, every process of it at once, while its engine scores: Ray restarts
    the engine actor on the head and retries its batches, and the run finishes with every pair
    exactly once. On a token-authenticated cluster, as every test here: `run --ray-address` joins
    it with the token in ~/.ray/auth_token and RAY_AUTH_MODE unset."""
    env = client_env(with_token_file(client_home, ray_head.token))
    worker, temp_dir = start_node({}, WORKER_NODE_WORKER_PORTS, ray_head.token, "--address", ray_head.gcs)
    holder = run = None
    try:
        with open(tmp_path / "holder.log", "wb") as log:
            # a plain Ray driver, which sends the token only with RAY_AUTH_MODE=token
            holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_HEAD, ray_head.gcs], text=True,
                                      env=node_environment(ray_head.token), stdout=subprocess.PIPE, stderr=log)
        assert holder.stdout.readline().strip() == "holding", (tmp_path / "holder.log").read_text()[-3000:]
        pairs = candidate_lists(queries=4, per_query=10, seed=47)
        write_shards(pairs, tmp_path / "input", shards=2)
        output = tmp_path / "output"
        run = subprocess.Popen(
            [str(VENV_BIN / "rank1-batch"), "run", "--ray-address", ray_head.gcs, "--input", str(tmp_path / "input"),
             "--output", str(output), "--batch-size", "4", *tiny_run_options()],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list(output.glob("scores/part-*.parquet")):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0].decode()[-3000:]
            time.sleep(0.1)
        on_worker = [process for process in psutil.Process(worker.pid).children(recursive=True)
                     if "ScorePairs" in command_line(process)]
        assert on_worker, "the engine actor did not start on the worker node"

        stop_node(worker)
        holder.kill()
        out, _ = run.communicate(timeout=600)
        assert run.returncode == 0, out.decode()[-3000:]
        for directory in ("scores", "traces", "ranked"):
            assert pair_keys(read_dir(output / directory)) == pair_keys(pairs), directory
        counts = json.loads((output / "_manifest.json").read_text())["counts"]
        assert counts["input"] == counts["scored"] == pairs.num_rows
    finally:
        for process in (run, holder):
            if process is not None and process.poll() is None:
                process.kill()
        stop_node(worker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_session_ray_is_untouched(submitted, ray_session):
    import ray

    assert ray.get(ray.put("still here")) == "still here"
