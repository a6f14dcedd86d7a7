"""Run jobs on a Ray cluster through its Jobs API: submit, status, logs, stop.

`submit` takes the options of `run`, resolves them here (job spec first, the command line's
options over it) and sends the cluster one `rank1-batch run` command line holding every option,
so the job spec never has to travel with the job. The cluster needs the package installed: its
image has it (cluster/Dockerfile), `--package` pip-installs a release, and `--working-dir` ships a
checkout whose `rank1_batch/` then comes before the installed one.

Storage credentials never travel with a job: the cluster's nodes get them from their IAM role
(IRSA on EKS, an instance profile on VMs). A runtime env that carries one is refused.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import re
import shlex
import time
from contextlib import contextmanager

import click
import yaml

from ..cli_options import RUN_PARAMETERS, engine_options, job_config, run_options
from ..config import JobConfig
from .connection import ClusterError, token_refused, use_auth_token

# Never uploaded with --working-dir: environments, VCS data and caches, not code.
WORKING_DIR_EXCLUDES = [".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "rank1-demo-*", "output"]
CREDENTIAL_WORDS = {"secret", "token", "password", "passwd", "credential", "credentials"}
CREDENTIAL_PAIRS = {("access", "key"), ("private", "key"), ("api", "key")}
POLL_SECONDS = 2.0

ADDRESS_HELP = "Ray dashboard of the cluster, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS)."


def is_credential_name(name: str) -> bool:
    """Whether a variable or key name is one that holds a secret: AWS_SECRET_ACCESS_KEY, HF_TOKEN,
    secretKeyRef (but not TOKENIZERS_PARALLELISM)."""
    words = [word.lower() for word in re.findall(r"[A-Z]?[a-z0-9]+|[A-Z0-9]+(?![a-z])", name)]
    return bool(CREDENTIAL_WORDS & set(words)) or bool(CREDENTIAL_PAIRS & set(zip(words, words[1:])))


def entrypoint(job: JobConfig) -> str:
    """The `rank1-batch run` command line that runs `job`: every option, spelled as `run` takes it."""
    values = job.options()
    words = ["rank1-batch", "run"]
    for option in RUN_PARAMETERS:
        if option.name in values:  # all but --config, which is resolved already
            words += _option_words(option, values[option.name])
    return shlex.join(words)


def _option_words(option: click.Option, value) -> list[str]:
    name = option.opts[0]
    if value is None:
        return []
    if option.secondary_opts:  # --x/--no-x
        return [name if value else option.secondary_opts[0]]
    if isinstance(value, dict):  # --column C=S, --engine-arg KEY=JSON
        encode = json.dumps if option.name == "engine_args" else str
        return [word for key, item in value.items() for word in (name, f"{key}={encode(item)}")]
    if isinstance(value, (list, tuple)) and option.multiple:  # --input, repeated
        return [word for item in value for word in (name, str(item))]
    if isinstance(value, (list, tuple)):  # --grades A,B,C
        return [name, ",".join(map(str, value))]
    return [name, str(value)]


def for_cluster(job: JobConfig) -> JobConfig:
    """A relative local path would name a file inside the job's working directory on the cluster:
    make it absolute, as the user meant it (it names the same file only where the cluster shares
    this machine's files; object storage URLs are unchanged)."""

    def absolute(url: str) -> str:
        return url if "://" in url else os.path.abspath(url)

    run_config = dataclasses.replace(job.run, input=tuple(map(absolute, job.run.input)), output=absolute(job.run.output))
    return dataclasses.replace(job, run=run_config)


def runtime_env(base: dict, working_dir: str | None, package: str | None) -> dict:
    """The job's runtime env: the --runtime-env file, with --working-dir or --package over it."""
    env = copy.deepcopy(base)
    if working_dir:
        env["working_dir"] = os.path.abspath(working_dir)
        excludes = env.get("excludes", [])
        env["excludes"] = excludes + [pattern for pattern in WORKING_DIR_EXCLUDES if pattern not in excludes]
    if package:
        pip = env.get("pip")
        env["pip"] = {**pip, "packages": [package]} if isinstance(pip, dict) else [package]
    credentials = sorted(filter(is_credential_name, env.get("env_vars", {})))
    if credentials:
        raise click.UsageError(
            f"the runtime env sets {', '.join(credentials)}: credentials reach the workers through their "
            "IAM role (IRSA on EKS, an instance profile on VMs), never through a job"
        )
    return env


def load_runtime_env(path: str | None) -> dict:
    if not path:
        return {}
    with open(path, encoding="utf-8") as spec:
        env = yaml.safe_load(spec) or {}
    if not isinstance(env, dict):
        raise click.UsageError(f"{path}: a runtime env is a mapping (working_dir, pip, env_vars, ...)")
    return env


@contextmanager
def job_api(address: str | None):
    """A client of the cluster's Jobs API, sending the authentication token if there is one; its
    errors (unreachable, token missing or refused, unknown job) end the command."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        source = use_auth_token()
        yield JobSubmissionClient(address)
    except AuthenticationError:
        shown = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
        raise click.ClickException(token_refused(shown, source)) from None
    except (ConnectionError, RuntimeError, ClusterError) as error:
        raise click.ClickException(str(error)) from None


def tail_logs(client, job_id: str) -> None:
    """Print the job's logs as they come, until the job ends."""

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            click.echo(lines, nl=False)

    asyncio.run(tail())


def outcome(message: str) -> str:
    """Ray's message about a job, without the tail of its logs that Ray appends when the job
    failed (`logs` prints those)."""
    return message.split(", last available logs", 1)[0]


def wait_for_end(client, job_id: str):
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        time.sleep(POLL_SECONDS)
    return info


@click.command("submit")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--working-dir", type=click.Path(exists=True, file_okay=False),
              help="Ship this checkout with the job (.git, .venv and caches left out).")
@click.option("--package", metavar="SPEC", help="pip-install this on the cluster, e.g. rank1-batch==0.1.0 or a wheel URL.")
@click.option("--runtime-env", "runtime_env_path", type=click.Path(exists=True, dir_okay=False),
              help="Ray runtime env YAML (e.g. cluster/runtime-env.yaml); --working-dir and --package go over it.")
@click.option("--job-id", help="Submission id (default: one Ray makes up); a second job cannot reuse it.")
@click.option("--follow/--no-follow", default=False, help="Print the job's logs until it ends; exit 0 only if it succeeded.")
@run_options
@engine_options
def submit_command(address, working_dir, package, runtime_env_path, job_id, follow, config_path, **given):
    """Run `rank1-batch run` with these options as a job on a Ray cluster; prints the job id."""
    if working_dir and package:
        raise click.UsageError("give --working-dir or --package, not both")
    job = job_config(config_path, given)
    if not job.run.input or not job.run.output:
        raise click.UsageError("--input and --output are required (on the command line or in --config)")
    if job.run.ray_address:
        raise click.UsageError("--ray-address is for `run`; a submitted job runs on the cluster of --address")
    env = runtime_env(load_runtime_env(runtime_env_path), working_dir, package)
    with job_api(address) as client:
        job_id = client.submit_job(entrypoint=entrypoint(for_cluster(job)), runtime_env=env, submission_id=job_id)
        click.echo(job_id)
        if not follow:
            return
        tail_logs(client, job_id)
        info = wait_for_end(client, job_id)
    if info.status != "SUCCEEDED":
        raise click.ClickException(f"job {job_id} {info.status}: {outcome(info.message)}")
    click.echo(f"job {job_id} SUCCEEDED", err=True)


@click.command("status")
@click.argument("job_id")
@click.option("--address", help=ADDRESS_HELP)
def status_command(job_id, address):
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and Ray's message."""
    with job_api(address) as client:
        info = client.get_job_info(job_id)
    click.echo(f"{info.status}: {outcome(info.message)}")


@click.command("logs")
@click.argument("job_id")
@click.option("--address", help=ADDRESS_HELP)
@click.option("--follow/--no-follow", default=False, help="Keep printing until the job ends.")
def logs_command(job_id, address, follow):
    """Print a job's logs (its driver's output)."""
    with job_api(address) as client:
        if follow:
            tail_logs(client, job_id)
        else:
            click.echo(client.get_job_logs(job_id), nl=False)


@click.command("stop")
@click.argument("job_id")
@click.option("--address", help=ADDRESS_HELP)
def stop_command(job_id, address):
    """Stop a job; outputs written so far stay, and a re-run with the same options resumes."""
    with job_api(address) as client:
        if client.stop_job(job_id):
            click.echo(f"stopping {job_id}")
        else:
            click.echo(f"{job_id} is not running ({client.get_job_status(job_id)})")
