"""One typed job configuration: engine, scoring and run options, loaded from YAML and the CLI."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import yaml

from .model.cross_encoder_templates import cross_encoder_template
from .model.prompt import QUERY_PLACEHOLDER

TINY_MODEL = "tiny"
TINY_MODEL_DIR = Path(__file__).parent / "assets" / "tiny-rank1"
TINY_CROSS_ENCODER = "tiny-cross-encoder"
TINY_CROSS_ENCODER_DIR = Path(__file__).parent / "assets" / "tiny-cross-encoder"
BUNDLED_MODELS = {TINY_MODEL: TINY_MODEL_DIR, TINY_CROSS_ENCODER: TINY_CROSS_ENCODER_DIR}
# The kinds of model that score a pair (see model/scorer_kinds.py): Rank1 reasons, then answers;
# a cross-encoder reads the pair once through a sequence-classification head.
SCORERS = ("rank1", "cross-encoder")
DEFAULT_CROSS_ENCODER_TEMPLATE = "pair"
# How a prompt meets the context: `reference` keeps the prompt whole and shrinks the reasoning
# budget to what is left, as the public reference does; `budget` cuts the passage so that the
# whole budget fits.
FIT_POLICIES = ("reference", "budget")
# How a pair's samples become its label and grade: `mean`, the label most samples give (a tie of
# votes going to the mean P(true)'s side) and the grade of the mean P(true); `mode`, the most common
# of the samples' own labels and grades, a tie going to the lower, as UMBRELA's ensemble breaks ties.
AGGREGATES = ("mean", "mode")
DEFAULT_FIT = "reference"
DEVICES = ("auto", "gpu", "cpu")


class JobError(Exception):
    """A run refused or stopped for a reason its message states in full."""


class ModelRequired(JobError):
    pass


def job_logging() -> None:
    """What a job does, at INFO, on stderr (the driver's terminal, an actor's log file)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__package__).setLevel(logging.INFO)


def resolve_model(model: str) -> str:
    """`tiny` and `tiny-cross-encoder` name the models bundled with the package; anything else
    goes to vLLM as given."""
    return str(BUNDLED_MODELS[model]) if model in BUNDLED_MODELS else model


@dataclass(frozen=True)
class EngineConfig:
    """How one vLLM engine is built, and what each of its requests asks. Defaults follow the
    reference procedure. Each field is the `run` option of the same name (`max_model_len`:
    `--max-model-len`) and the job spec's key; `engine_args` is `--engine-arg KEY=JSON`, repeatable.

    `model` has no default: a run names it (`tiny` is the bundled toy, used only when named).
    """

    model: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None  # None: the reference's 16,000, or the model's own context if shorter
    max_reasoning_tokens: int = 8192
    # See FIT_POLICIES. None: a resumed output keeps its own policy, anything else gets DEFAULT_FIT.
    fit: str | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    block_size: int | None = None  # KV-cache block in tokens; None: 32 on CPU, vLLM's default on GPU
    enforce_eager: bool = False
    quantization: str | None = None
    trust_remote_code: bool = False
    seed: int = 0
    # Self-consistency: each pair judged `samples` times, its reasoning sampled at `temperature`
    # within the `top_p` nucleus (each sample's seed derived from `seed`, the prompt and the
    # sample's index); the score is the samples' mean, the label their majority. One sample at
    # temperature 0 is the reference's greedy judgement.
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    # The scheduler's limits: most sequences in one engine step, and most tokens (None: vLLM's).
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        positive = {"max_reasoning_tokens": self.max_reasoning_tokens, "tensor_parallel_size": self.tensor_parallel_size,
                    "max_model_len": self.max_model_len, "block_size": self.block_size,
                    "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                    "samples": self.samples}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, not {value}")
        # floats whether given as 1 (YAML) or 1.0 (the command line): they are in the store's key
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        if not 0 <= self.temperature <= 2:  # vLLM's range: it refuses each request beyond it
            raise ValueError(f"--temperature must be in [0, 2], not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], not {self.top_p}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"--samples {self.samples} at --temperature 0 would judge each pair the same way "
                             f"{self.samples} times: give a --temperature above 0")
        if self.fit is not None and self.fit not in FIT_POLICIES:
            raise ValueError(f"{_flag('fit')} {self.fit!r}: expected {' or '.join(FIT_POLICIES)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], not {self.gpu_memory_utilization}")
        owned = sorted(set(self.engine_args) & ENGINE_ARGS_OWNED)
        if owned:
            raise ValueError(
                f"--engine-arg {', '.join(owned)}: set by its own option ({', '.join(map(_flag, owned))})"
            )

    @property
    def model_path(self) -> str:
        if not self.model:
            raise ModelRequired(
                "no model: give --model (or model: in a job spec), e.g. jhu-clsp/rank1-7b; `--model tiny` is the bundled toy"
            )
        return resolve_model(self.model)


# The sampling options at their defaults: one greedy judgement per pair, as outputs and score
# stores made before these options existed were judged.
GREEDY = {name: getattr(EngineConfig, name) for name in ("samples", "temperature", "top_p")}


@dataclass(frozen=True)
class ScoringConfig:
    """What turns a pair into a prompt or a model input, and a score into a label. Each field is
    the `run` option of the same name."""

    threshold: float = 0.5
    # Graded labels: three cut points of the score, a pair's grade (0 to 3) being how many it reaches.
    grades: tuple[float, ...] | None = None
    task_template: str | None = None
    # One of SCORERS.
    scorer: str = "rank1"
    # How a pair becomes the cross-encoder's input, and what of its logit is the score (one of
    # cross_encoder_templates.TEMPLATES); None with Rank1, DEFAULT_CROSS_ENCODER_TEMPLATE if not given.
    cross_encoder_template: str | None = None
    # One of AGGREGATES.
    aggregate: str = "mean"

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"--aggregate {self.aggregate!r}: expected {' or '.join(AGGREGATES)}")
        if self.scorer not in SCORERS:
            raise ValueError(f"--scorer {self.scorer!r}: expected {' or '.join(SCORERS)}")
        if self.scorer == "rank1" and self.cross_encoder_template is not None:
            raise ValueError("--cross-encoder-template applies to --scorer cross-encoder only")
        if self.scorer == "cross-encoder":
            template = self.cross_encoder_template or DEFAULT_CROSS_ENCODER_TEMPLATE
            cross_encoder_template(template)  # an unknown name is refused here
            object.__setattr__(self, "cross_encoder_template", template)
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"--threshold must be in [0, 1], not {self.threshold}")
        if self.grades is not None:
            object.__setattr__(self, "grades", grade_cuts(self.grades))
        if self.task_template is not None and QUERY_PLACEHOLDER not in self.task_template:
            raise ValueError(f"--task-template must contain {QUERY_PLACEHOLDER}, where the query goes")


# The scorer options at their defaults: Rank1, by the mean of its samples, as outputs and score
# stores made before there were other kinds (or aggregates) were scored.
RANK1_SCORER = {"scorer": "rank1", "cross_encoder_template": None, "aggregate": "mean"}


@dataclass(frozen=True)
class RunConfig:
    """Where the pairs come from and go to, and how the Ray job is shaped. Each field is the
    `run` option of the same name, but for `columns` (`--column`, repeatable), `write_traces`
    (`--traces`) and `labels_answered_only` (`--answered-only`)."""

    input: tuple[str, ...] = ()
    output: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    top_k: int | None = None
    write_traces: bool = True
    labels: bool = False
    labels_answered_only: bool = False
    trec_run: bool = True
    run_tag: str = "rank1"
    engines: int | None = None  # a fixed pool; without it and without min/max, one engine
    min_engines: int | None = None
    max_engines: int | None = None
    cpus_per_engine: float = 1.0
    device: str = "auto"
    batch_size: int = 256
    # Batches each engine actor holds at once: while one batch's last chains finish, the next
    # batches' pairs fill the engine. 1 is one batch at a time. 8, as Ray's own vLLM stage: a batch
    # lasts as long as its longest chain, several times a mean one, so filling the engine's slots
    # takes several batches' worth of pairs (measured: occupancy 199 at 8, 131 at 4, 36 at 1).
    max_concurrent_batches: int = 8
    # A score store (fsspec URL): pairs judged before, under the same key, are reused, not scored.
    store: str | None = None
    # Merge the part files of a finished run into files of a few hundred MB (see job/compaction.py).
    compact: bool = False
    ray_address: str | None = None
    s3_endpoint_url: str | None = None
    s3_profile: str | None = None
    overwrite: bool = False
    verbose: bool = False
    # Seconds an engine may wait to be placed (an autoscaling cluster may add a node meanwhile).
    placement_timeout: float = 600.0
    # Seconds without a committed batch after which the run fails: well above one batch at the
    # reference budget (8,192 tokens) on a GPU, and above a first batch that waits for weights.
    stall_timeout: float = 1800.0
    # Seconds after SIGTERM for the batches in flight to commit before the run exits: inside
    # Kubernetes' default grace of 30 s; raise both together where batches take longer.
    grace_period: float = 25.0
    # Seconds after a lease's last heartbeat (renewed every 15 s) when its run counts as dead and
    # another run may take the output over: long enough to outlast a slow object store's pauses,
    # short enough that a RayJob retry on a new head waits a couple of minutes, not its retries.
    lease_timeout: float = 120.0
    # Share of the pairs to rerank (input pairs within the top k) rejected or fallen back, above
    # which the run exits non-zero.
    max_failed_share: float = 0.05

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"--device {self.device!r}: expected {', '.join(DEVICES)}")
        if self.engines is not None and (self.min_engines is not None or self.max_engines is not None):
            raise ValueError("give --engines (a fixed pool) or --min-engines/--max-engines (autoscaling), not both")
        for name in ("engines", "min_engines", "max_engines", "top_k", "batch_size", "max_concurrent_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, not {value}")
        if self.min_engines and self.max_engines and self.min_engines > self.max_engines:
            raise ValueError(f"--min-engines {self.min_engines} is more than --max-engines {self.max_engines}")
        if self.cpus_per_engine < 0:
            raise ValueError(f"--cpus-per-engine must not be negative, not {self.cpus_per_engine}")
        for name in ("placement_timeout", "stall_timeout", "grace_period", "lease_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{_flag(name)} must be a positive number of seconds")
        if not 0 <= self.max_failed_share <= 1:
            raise ValueError(f"--max-failed-share must be in [0, 1], not {self.max_failed_share}")


@dataclass(frozen=True)
class CascadeConfig:
    """A cross-encoder in front of Rank1: it scores each query's `top_k` first-stage candidates
    (all of them when None), and Rank1 judges the query's `--top-k` best of its order. Its engine
    is the job's, with its own model, template, dtype and context. Options: `--cascade-` and the
    field's name."""

    model: str | None = None  # None: no cascade
    template: str = DEFAULT_CROSS_ENCODER_TEMPLATE
    top_k: int | None = None
    dtype: str | None = None  # None: the job's --dtype
    max_model_len: int | None = None  # None: the model's own context, up to the reference's

    def __post_init__(self):
        cross_encoder_template(self.template)
        for name in ("top_k", "max_model_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--cascade-{name.replace('_', '-')} must be at least 1, not {value}")
        given = [name for name in ("top_k", "dtype", "max_model_len") if getattr(self, name) is not None]
        if self.model is None and (given or self.template != DEFAULT_CROSS_ENCODER_TEMPLATE):
            raise ValueError(f"--cascade-{(given or ['template'])[0].replace('_', '-')} needs --cascade-model, "
                             "the cross-encoder in front of Rank1")


# The parts of a job, each with the prefix its options have on the command line and in a job spec.
PARTS = (("engine", EngineConfig, ""), ("scoring", ScoringConfig, ""), ("run", RunConfig, ""),
         ("cascade", CascadeConfig, "cascade_"))


@dataclass(frozen=True)
class JobConfig:
    """A whole job: its four parts, checked against each other when built. `from_options`
    builds one from flat options (a job spec's keys or the command line's names), and `options`
    gives them back."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)

    def __post_init__(self):
        """Settings that depend on each other across the parts."""
        if self.scoring.scorer == "cross-encoder":
            if self.engine.samples > 1:
                raise ValueError(f"--samples {self.engine.samples} samples Rank1's reasoning; a cross-encoder reads "
                                 "a pair once, the same way each time")
            if self.scoring.task_template is not None:
                raise ValueError("--task-template wraps Rank1's query; a cross-encoder's input is its "
                                 "--cross-encoder-template")
            if self.run.labels_answered_only:
                raise ValueError("--answered-only keeps the pairs Rank1 answered; a cross-encoder's have no outcome")
            self._need_probability(cross_encoder_template(self.scoring.cross_encoder_template).score,
                                   f"--cross-encoder-template {self.scoring.cross_encoder_template}")
        if self.cascade.model is not None:
            if self.scoring.scorer != "rank1":
                raise ValueError("--cascade-model puts a cross-encoder in front of Rank1: give --scorer rank1")
            if self.run.top_k is None:
                raise ValueError("--cascade-model needs --top-k: how many of each query's candidates, in the "
                                 "cross-encoder's order, Rank1 judges")
            if self.cascade.top_k is not None and self.run.top_k > self.cascade.top_k:
                raise ValueError(f"--top-k {self.run.top_k} is more than --cascade-top-k {self.cascade.top_k}: Rank1 "
                                 "judges candidates the cross-encoder scored, so k may not exceed K")

    def _need_probability(self, score_function: str, source: str) -> None:
        if score_function == "sigmoid":
            return
        for given, option in ((self.run.labels, "--labels"), (self.scoring.grades is not None, "--grades")):
            if given:
                raise ValueError(f"{option} needs a score that is a probability; with {source} the score is the "
                                 "model's raw logit")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "JobConfig":
        """Build from flat options (YAML keys or CLI names; dashes and underscores alike)."""
        options = {key.replace("-", "_"): value for key, value in options.items()}
        if "input" in options:
            inputs = options["input"]
            options["input"] = (inputs,) if isinstance(inputs, str) else tuple(inputs)
        parts = {}
        for name, part, prefix in PARTS:
            names = {prefix + f.name for f in fields(part)}
            parts[name] = part(**{key[len(prefix):]: options.pop(key) for key in names & options.keys()})
        if options:
            raise ValueError(f"unknown job option(s): {', '.join(sorted(options))}")
        return cls(**parts)

    def options(self) -> dict[str, Any]:
        """The job as flat options, as `from_options` takes them."""
        return {prefix + name: value for part, _, prefix in PARTS
                for name, value in dataclasses.asdict(getattr(self, part)).items()}

    def ineffective_options(self) -> list[str]:
        """Options set to something that cannot take effect with the others."""
        found = []
        if self.run.labels_answered_only and not self.run.labels:
            found.append("--answered-only has no effect without --labels")
        if self.run.run_tag != RunConfig.run_tag and not self.run.trec_run:
            found.append("--run-tag has no effect with --no-trec-run")
        if (self.scoring.scorer == "cross-encoder" and self.scoring.threshold != ScoringConfig.threshold
                and cross_encoder_template(self.scoring.cross_encoder_template).score == "logit"):
            found.append("--threshold has no effect on a raw logit, which gets no label")
        if self.engine.top_p != GREEDY["top_p"] and self.engine.temperature == 0:
            found.append("--top-p has no effect at --temperature 0 (greedy)")
        in_flight = self.run.batch_size * self.run.max_concurrent_batches
        # each of a pair's samples is a sequence of its own
        if self.engine.max_num_seqs and in_flight * self.engine.samples < self.engine.max_num_seqs:
            each = f" of {self.engine.samples} samples each" if self.engine.samples > 1 else ""
            found.append(f"--batch-size {self.run.batch_size} x --max-concurrent-batches {self.run.max_concurrent_batches} "
                         f"= {in_flight} pairs in flight{each} cannot fill --max-num-seqs {self.engine.max_num_seqs}")
        return found

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the input URLs as a list)."""
        described = dataclasses.asdict(self)
        described["run"]["input"] = list(self.run.input)
        if self.scoring.grades is not None:  # as _job.json reads back, so that a resume compares alike
            described["scoring"]["grades"] = list(self.scoring.grades)
        return described


# vLLM engine arguments that a typed option sets: an --engine-arg may not set them behind its back.
ENGINE_ARGS_OWNED = {
    "model", "revision", "tokenizer_revision", "dtype", "max_model_len", "tensor_parallel_size",
    "gpu_memory_utilization", "enable_prefix_caching", "block_size", "enforce_eager", "quantization",
    "trust_remote_code", "seed", "max_num_seqs", "max_num_batched_tokens",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def grade_cuts(given: str | Iterable[float]) -> tuple[float, ...]:
    """Three cut points from `0.1,0.5,0.9` (the command line) or a list (a job spec)."""
    try:
        cuts = tuple(float(cut) for cut in (given.split(",") if isinstance(given, str) else given))
    except (TypeError, ValueError):
        cuts = ()
    if len(cuts) != 3 or not all(0 <= cut <= 1 for cut in cuts) or not cuts[0] < cuts[1] < cuts[2]:
        raise ValueError(f"--grades must be three cut points in [0, 1], strictly increasing, e.g. 0.1,0.5,0.9; not {given!r}")
    return cuts


def load_options(path: str | Path) -> dict[str, Any]:
    """The flat options of a YAML job spec."""
    with open(path, encoding="utf-8") as spec:
        options = yaml.safe_load(spec) or {}
    if not isinstance(options, dict):
        raise ValueError(f"{path}: a job spec is a mapping of option names to values")
    return options
