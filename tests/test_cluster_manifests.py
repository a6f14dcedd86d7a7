"""The cluster manifests agree with the code, the pins and each other; none carries a credential."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from rank1_batch.cli import job_config, run
from rank1_batch.config import JobConfig, load_options
from rank1_batch.cluster.resources import actor_pool_size
from rank1_batch.cluster.submit import is_credential_name, load_runtime_env, runtime_env

from .conftest import ROOT

CLUSTER = ROOT / "cluster"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = (CLUSTER / "Dockerfile").read_text()
JOB_SPECS = sorted((ROOT / "jobs").glob("*.yaml"))


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((CLUSTER / name).read_text()) if doc]


def kind(name: str, wanted: str) -> dict:
    (doc,) = [doc for doc in documents(name) if doc.get("kind") == wanted]
    return doc


RAYJOB = kind("rayjob-nightly.yaml", "RayJob")
RAYCLUSTER = kind("raycluster.yaml", "RayCluster")
AWS = documents("aws-cluster.yaml")[0]


def pin(requirements: list[str], package: str) -> str:
    (version,) = [re.fullmatch(rf"{package}(\[[^\]]*\])?==(\S+)", r).group(2) for r in requirements
                  if re.fullmatch(rf"{package}(\[[^\]]*\])?==\S+", r)]
    return version


RAY_VERSION = pin(PYPROJECT["project"]["dependencies"], "ray")
VLLM_VERSION = pin(PYPROJECT["project"]["optional-dependencies"]["gpu"], "vllm")
PACKAGE_VERSION = PYPROJECT["project"]["version"]


def dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE).group(1)


def built_image() -> str:
    """The tag the Dockerfile's build command gives the image."""
    return re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", DOCKERFILE).group(1)


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    return [spec["headGroupSpec"]["template"], *(group["template"] for group in spec["workerGroupSpecs"])]


def containers(template: dict) -> list[dict]:
    return [*template["spec"].get("initContainers", []), *template["spec"]["containers"]]


def images() -> dict[str, set[str]]:
    found = {name: {c["image"] for t in pod_templates(doc) for c in containers(t)}
             for name, doc in (("rayjob-nightly.yaml", RAYJOB), ("raycluster.yaml", RAYCLUSTER))}
    found["aws-cluster.yaml"] = {AWS["docker"]["image"]}
    return found


def test_one_image_everywhere_and_it_is_the_dockerfile_build():
    found = images()
    assert set().union(*found.values()) == {built_image()}, found


def test_image_tag_names_the_package_ray_and_python_versions():
    base = re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-(py\d+)-gpu$", DOCKERFILE, re.MULTILINE)
    assert base, "FROM rayproject/ray:${RAY_VERSION}-pyNNN-gpu"
    repository, tag = built_image().rsplit(":", 1)
    assert repository.endswith("/rank1-batch")
    assert tag == f"{PACKAGE_VERSION}-ray{RAY_VERSION}-{base.group(1)}-gpu"


def test_dockerfile_versions_are_the_pyproject_pins():
    assert dockerfile_arg("RAY_VERSION") == RAY_VERSION
    assert dockerfile_arg("VLLM_VERSION") == VLLM_VERSION
    install = re.search(r"^RUN pip install (.+)$", DOCKERFILE, re.MULTILINE).group(1)
    assert '"vllm==${VLLM_VERSION}"' in install and '"ray[data,default]==${RAY_VERSION}"' in install
    assert "[gpu]" in install


def test_kuberay_ray_version_is_the_pin():
    assert cluster_spec(RAYJOB)["rayVersion"] == cluster_spec(RAYCLUSTER)["rayVersion"] == RAY_VERSION


def rayjob_entrypoint() -> tuple[list[str], str, JobConfig]:
    """The RayJob's command line, and the job it runs, parsed by the real `run` command with the
    job spec it names read from jobs/ (the image holds a copy of it)."""
    words = shlex.split(RAYJOB["spec"]["entrypoint"])
    options = words[2:]
    at = options.index("--config")
    image_path = options.pop(at + 1)
    options.pop(at)
    params = dict(run.make_context("run", options).params)
    params.pop("config_path")
    local = ROOT / "jobs" / Path(image_path).name
    return words, image_path, job_config(str(local), params)


def test_rayjob_runs_the_console_script_with_a_job_spec_from_jobs():
    words, image_path, job = rayjob_entrypoint()
    assert words[:2] == [next(iter(PYPROJECT["project"]["scripts"])), "run"]
    assert PYPROJECT["project"]["scripts"][words[0]] == "rank1_batch.cli:main"
    jobs_in_image = re.search(r"^COPY --chown=\S+ jobs/ (\S+)$", DOCKERFILE, re.MULTILINE).group(1)
    assert image_path == f"{jobs_in_image}{Path(image_path).name}"
    assert (ROOT / "jobs" / Path(image_path).name).is_file()
    assert job.run.input and job.run.output


def test_rayjob_ends_its_cluster_and_bounds_its_retries_and_time():
    spec = RAYJOB["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0


def test_raycluster_autoscales_its_gpu_workers():
    spec = RAYCLUSTER["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["minReplicas"] < group["maxReplicas"]


def worker_groups(doc: dict) -> list[dict]:
    """GPUs, CPUs and the most workers of each GPU worker group."""
    groups = []
    for group in cluster_spec(doc)["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        resources = container["resources"]
        assert resources["requests"] == resources["limits"]  # a node's share is what Ray sees
        groups.append({"gpus": int(resources["limits"]["nvidia.com/gpu"]),
                       "cpus": float(resources["limits"]["cpu"]), "workers": group["maxReplicas"]})
    return groups


def aws_worker_groups() -> list[dict]:
    return [{"gpus": node["resources"]["GPU"], "cpus": node["resources"]["CPU"], "workers": node["max_workers"]}
            for name, node in AWS["available_node_types"].items() if name != AWS["head_node_type"]]


def jobs_run_by(name: str) -> list[JobConfig]:
    """The jobs a manifest is for: the RayJob's own, or every job spec for a long-lived cluster."""
    if name == "rayjob-nightly.yaml":
        return [rayjob_entrypoint()[2]]
    return [JobConfig.from_options(load_options(spec)) for spec in JOB_SPECS]


GPU_WORKERS = {
    "rayjob-nightly.yaml": lambda: worker_groups(RAYJOB),
    "raycluster.yaml": lambda: worker_groups(RAYCLUSTER),
    "aws-cluster.yaml": aws_worker_groups,
}


@pytest.mark.parametrize("name", sorted(GPU_WORKERS))
def test_gpu_workers_fit_the_engines_of_their_jobs(name):
    groups = GPU_WORKERS[name]()
    assert groups and all(group["gpus"] >= 1 for group in groups)
    for job in jobs_run_by(name):
        tensor_parallel = job.engine.tensor_parallel_size
        pool = actor_pool_size(job.run)
        most_engines = pool.get("size") or pool["max_size"]
        for group in groups:
            # An engine's ranks share a node (STRICT_PACK), so a node's GPUs come in whole engines.
            assert group["gpus"] % tensor_parallel == 0, (name, tensor_parallel)
            assert group["cpus"] >= group["gpus"] // tensor_parallel * job.run.cpus_per_engine
        assert sum(g["gpus"] * g["workers"] for g in groups) >= most_engines * tensor_parallel


def test_kuberay_heads_take_no_gpu_and_no_batches():
    for doc in (RAYJOB, RAYCLUSTER):
        head = cluster_spec(doc)["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0"
        (container,) = head["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in container["resources"]["limits"]


def test_every_pod_runs_as_the_irsa_service_account():
    for name in ("rayjob-nightly.yaml", "raycluster.yaml"):
        (account,) = [doc for doc in documents(name) if doc["kind"] == "ServiceAccount"]
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        doc = RAYJOB if "rayjob" in name else RAYCLUSTER
        assert {t["spec"]["serviceAccountName"] for t in pod_templates(doc)} == {account["metadata"]["name"]}


def test_aws_cluster_is_a_valid_launcher_config_with_spot_gpu_workers():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(AWS, schema)
    assert AWS["provider"]["type"] == "aws"
    for name, node in AWS["available_node_types"].items():
        assert node["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
        if name != AWS["head_node_type"]:
            assert node["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
            assert node["resources"]["GPU"] >= 1


def test_runtime_env_pins_this_release_and_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = runtime_env(load_runtime_env(str(CLUSTER / "runtime-env.yaml")), None, None)
    assert env["pip"] == [f"{PYPROJECT['project']['name']}=={PACKAGE_VERSION}"]
    assert all(isinstance(value, str) for value in env["env_vars"].values())
    RuntimeEnv(**env)


def keys_and_env_names(node) -> list[str]:
    """Every mapping key, and every name of an environment variable, in a parsed YAML document."""
    found = []
    if isinstance(node, dict):
        found += [str(key) for key in node]
        if "runtimeEnvYAML" in node:  # a RayJob's runtime env, as YAML text
            found += keys_and_env_names(yaml.safe_load(node["runtimeEnvYAML"]))
        if set(node) >= {"name", "value"} or "valueFrom" in node:
            found.append(str(node["name"]))
        for value in node.values():
            found += keys_and_env_names(value)
    elif isinstance(node, list):
        for item in node:
            found += keys_and_env_names(item)
    elif isinstance(node, str) and "=" in node:  # --env NAME=VALUE, export NAME=VALUE
        found += re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", node)
    return found


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_no_credential_in_a_manifest(path):
    for doc in yaml.safe_load_all(path.read_text()):
        names = keys_and_env_names(doc)
        assert names and not list(filter(is_credential_name, names))


def test_no_credential_in_the_image():
    names = re.findall(r"^(?:ENV|ARG)\s+([A-Za-z_][A-Za-z0-9_]*)", DOCKERFILE, re.MULTILINE)
    assert names and not list(filter(is_credential_name, names))


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.iterdir() if p.is_file()), ids=lambda p: p.name)
def test_no_key_material_anywhere_in_cluster(path):
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text)  # AWS access key ids
    assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*\S", text)
    assert "BEGIN RSA PRIVATE KEY" not in text and "BEGIN OPENSSH PRIVATE KEY" not in text
