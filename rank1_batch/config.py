"""One typed job configuration: engine, scoring and run options, loaded from YAML and the CLI."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

TINY_MODEL = "tiny"
TINY_MODEL_DIR = Path(__file__).parent / "assets" / "tiny-rank1"


def resolve_model(model: str) -> str:
    """`tiny` names the model bundled with the package; anything else goes to vLLM as given."""
    return str(TINY_MODEL_DIR) if model == TINY_MODEL else model


@dataclass(frozen=True)
class EngineConfig:
    """How one vLLM engine is built. Defaults follow the reference procedure."""

    model: str = TINY_MODEL
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the reference's 16,000, or the model's own context if shorter
    max_reasoning_tokens: int = 8192
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    block_size: int | None = None  # KV-cache block in tokens; None: 32 on CPU, vLLM's default on GPU
    enforce_eager: bool = False
    quantization: str | None = None
    trust_remote_code: bool = False
    seed: int = 0
    engine_args: dict[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> str:
        return resolve_model(self.model)


@dataclass(frozen=True)
class ScoringConfig:
    """What turns a pair into a prompt and a score into a label."""

    threshold: float = 0.5
    task_template: str | None = None


@dataclass(frozen=True)
class RunConfig:
    """Where the pairs come from and go to, and how the Ray job is shaped."""

    input: tuple[str, ...] = ()
    output: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    top_k: int | None = None
    write_traces: bool = True
    labels: bool = False
    labels_answered_only: bool = False
    trec_run: bool = True
    run_tag: str = "rank1"
    engines: int | None = 1
    min_engines: int | None = None
    max_engines: int | None = None
    cpus_per_engine: float = 1.0
    device: str = "auto"
    batch_size: int = 256
    ray_address: str | None = None
    s3_endpoint_url: str | None = None
    s3_profile: str | None = None
    overwrite: bool = False
    verbose: bool = False


@dataclass(frozen=True)
class JobConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "JobConfig":
        """Build from flat options (YAML keys or CLI names; dashes and underscores alike)."""
        options = {key.replace("-", "_"): value for key, value in options.items()}
        if "input" in options:
            inputs = options["input"]
            options["input"] = (inputs,) if isinstance(inputs, str) else tuple(inputs)
        parts = {}
        for name, part in (("engine", EngineConfig), ("scoring", ScoringConfig), ("run", RunConfig)):
            names = {f.name for f in fields(part)}
            parts[name] = part(**{key: options.pop(key) for key in names & options.keys()})
        if options:
            raise ValueError(f"unknown job option(s): {', '.join(sorted(options))}")
        return cls(**parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the input URLs as a list)."""
        described = dataclasses.asdict(self)
        described["run"]["input"] = list(self.run.input)
        return described


def load_options(path: str | Path) -> dict[str, Any]:
    """The flat options of a YAML job spec."""
    with open(path, encoding="utf-8") as spec:
        options = yaml.safe_load(spec) or {}
    if not isinstance(options, dict):
        raise ValueError(f"{path}: a job spec is a mapping of option names to values")
    return options
