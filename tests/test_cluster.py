"""Which Ray a run joins, and where the authentication token comes from. The token against a real
authenticated head is tested in test_submit.py, beside the head it starts."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pytest

from rank1_batch.cluster.connection import (
    CONNECT_TIMEOUT_SECONDS, ClusterError, RayNotices, is_own_cluster, ray_address, reachable, token_source,
)
from rank1_batch.config import RunConfig

from .conftest import candidate_lists, write_shards

VENV_BIN = Path(sys.executable).parent
# Seconds a failed command may take to exit, beyond the time limit of its connection.
EXIT_SECONDS = 10


def test_address_order(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert ray_address(RunConfig(ray_address="10.0.0.1:6379")) == "10.0.0.1:6379"
    assert ray_address(RunConfig()) == "10.0.0.2:6379"
    assert not is_own_cluster(RunConfig())
    monkeypatch.setenv("RAY_ADDRESS", "")
    assert ray_address(RunConfig()) == "local"
    monkeypatch.delenv("RAY_ADDRESS")
    assert ray_address(RunConfig()) == "local" and is_own_cluster(RunConfig())


def test_a_dashboard_address_is_refused_by_name():
    with pytest.raises(ClusterError, match="http://head:8265 is a dashboard's address"):
        reachable("http://head:8265")


def test_token_source_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("  from-home\nsecond line\n")
    named = tmp_path / "token"
    named.write_text("from-path\n")
    assert token_source({"HOME": str(home)}) == str(home / ".ray" / "auth_token")
    assert token_source({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named)}) == f"RAY_AUTH_TOKEN_PATH ({named})"
    both = {"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named), "RAY_AUTH_TOKEN": "from-env"}
    assert token_source(both) == "RAY_AUTH_TOKEN"
    # As in Ray, the first source that is set decides, even when it holds only whitespace.
    assert token_source({**both, "RAY_AUTH_TOKEN": " \n"}) is None
    assert token_source({"HOME": str(tmp_path)}) is None
    (home / ".ray" / "auth_token").write_text("\n")
    assert token_source({"HOME": str(home)}) is None


def test_token_path_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH is .*missing"):
        token_source({"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


@pytest.fixture
def closed_port():
    """A port bound on loopback but not listening: a connection to it is refused, and nothing else
    can take it meanwhile."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


@pytest.fixture
def client_env(tmp_path):
    """The environment of a command run on this machine with no Ray to join and no token: HOME is
    empty, so this machine's ~/.ray stays out of it (and untouched)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("RAY_AUTH_", "RAY_ADDRESS"))}
    (tmp_path / "home").mkdir()
    env["HOME"] = str(tmp_path / "home")
    return env


def run_command(args: list[str], env: dict, tmp_path: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`rank1-batch run ARGS` on a few pairs, and the seconds from its attempt to join a cluster
    (its log line) to its end: the command's start-up, slow on a busy machine, left out."""
    pairs = tmp_path / "pairs"
    write_shards(candidate_lists(2, 3, seed=5), pairs, 1)
    command = [str(VENV_BIN / "rank1-batch"), "run", "--model", "tiny", "--input", str(pairs),
               "--output", str(tmp_path / "out"), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    joining = re.search(r"^(\S+ \S+) INFO rank1_batch\.cluster\.connection: joining the Ray cluster", result.stderr, re.MULTILINE)
    assert joining, result.stderr
    return result, ended - datetime.strptime(joining[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def error_line(result: subprocess.CompletedProcess) -> str:
    """The command's one line of error; nothing else it printed may look like a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.integration
def test_unreachable_address_fails_fast_naming_it(closed_port, client_env, tmp_path):
    address = f"127.0.0.1:{closed_port}"
    result, seconds = run_command(["--ray-address", address], client_env, tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"no Ray cluster answers at {address}" in error_line(result)
    assert seconds < CONNECT_TIMEOUT_SECONDS + EXIT_SECONDS


@pytest.fixture
def stale_recorded_cluster(closed_port):
    """A Ray temp dir of the test's own (RAY_TMPDIR; short: Ray's socket paths live under it)
    whose ray_current_cluster names a head that is gone, as a killed `ray start` leaves it."""
    temp = Path(tempfile.mkdtemp(prefix="r1tmp-"))
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed_port}\n")
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.own_processes
def test_stale_recorded_cluster_is_not_joined(stale_recorded_cluster, closed_port, client_env):
    """Without an address the run starts a Ray of its own, and leaves the record as it was."""
    script = (
        "import ray\n"
        "from rank1_batch.cluster.connection import connect\n"
        "from rank1_batch.config import JobConfig\n"
        "connect(JobConfig.from_options({'model': 'tiny'}))\n"
        "print(ray.get_runtime_context().gcs_address)\n"
        "ray.shutdown()\n"
    )
    env = {**client_env, "RAY_TMPDIR": str(stale_recorded_cluster)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert not result.stdout.strip().endswith(f":{closed_port}")
    assert (stale_recorded_cluster / "ray" / "ray_current_cluster").read_text() == f"127.0.0.1:{closed_port}\n"


@pytest.mark.integration
def test_auto_fails_fast_on_a_stale_recorded_cluster(stale_recorded_cluster, closed_port, client_env, tmp_path):
    env = {**client_env, "RAY_TMPDIR": str(stale_recorded_cluster)}
    result, seconds = run_command(["--ray-address", "auto"], env, tmp_path)
    assert result.returncode == 1, result.stderr
    assert f":{closed_port}" in error_line(result)
    assert seconds < CONNECT_TIMEOUT_SECONDS + EXIT_SECONDS


@pytest.mark.parametrize("name, level, message, shown", [
    ("ray.data._internal.execution.streaming_executor", logging.INFO, "Starting execution of Dataset d_0", False),
    ("ray.data._internal.progress", logging.WARNING, "Progress bars disabled. To enable, set ...", False),
    ("ray._private.authentication.authentication_token_setup", logging.WARNING,
     "Token authentication is enabled for this Ray cluster.", False),
    ("ray.data._internal.execution.resource_manager", logging.WARNING, "Cluster resources are not enough", True),
    ("ray._private.worker", logging.ERROR, "A worker died or was killed", True),
])
def test_ray_notices_leave_out_only_what_a_user_does_not_act_on(name, level, message, shown):
    record = logging.LogRecord(name, level, __file__, 1, message, None, None)
    assert RayNotices().filter(record) is shown
