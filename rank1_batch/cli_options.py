"""The options of `run` (and of `submit`, which sends a run to a cluster), and how they become
one JobConfig: a YAML job spec first, then the options given on the command line."""

from __future__ import annotations

import json

import click

from .config import AGGREGATES, FIT_POLICIES, SCORERS, JobConfig, load_options
from .model.cross_encoder_templates import TEMPLATES

POOL_OPTIONS = ("engines", "min_engines", "max_engines")
# Where storage URLs lead, for every command that reads or writes them (never credentials).
S3_OPTIONS = (
    click.option("--s3-endpoint-url", help="S3 endpoint (credentials come from the AWS environment)."),
    click.option("--s3-profile", help="AWS profile for S3."),
)


def _with_options(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def s3_options(command):
    """--s3-endpoint-url and --s3-profile, as `run` takes them."""
    return _with_options(command, S3_OPTIONS)


def engine_options(command):
    """Options that shape the engine and the prompt, shared by every command that scores."""
    options = [
        click.option("--model", help="`tiny` (bundled), a Hugging Face id, or a local or remote path."),
        click.option("--revision", help="Model revision (branch, tag or commit)."),
        click.option("--dtype", help="Weights dtype: auto, float16, bfloat16, float32."),
        click.option("--max-model-len", type=int, help="Context length; prompts are fitted to it."),
        click.option("--max-reasoning-tokens", type=int, help="Budget of generated tokens per pair."),
        click.option("--fit", type=click.Choice(FIT_POLICIES),
                     help="A prompt too long for the context: `reference` keeps it whole and shrinks the "
                          "budget (the reference's rule; default), `budget` cuts the passage."),
        click.option("--tensor-parallel-size", type=int, help="GPUs per engine."),
        click.option("--gpu-memory-utilization", type=float, help="Share of GPU memory for vLLM."),
        click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=None),
        click.option("--block-size", type=int, help="KV-cache block in tokens (default: 32 on CPU, vLLM's on GPU)."),
        click.option("--enforce-eager/--no-enforce-eager", default=None, help="Skip graph compilation."),
        click.option("--quantization", help="vLLM quantization method, e.g. awq."),
        click.option("--trust-remote-code/--no-trust-remote-code", default=None),
        click.option("--seed", type=int, help="The engine's seed, from which each sample's seed is derived (default 0)."),
        click.option("--samples", type=int,
                     help="Judge each pair this many times, sampling its reasoning: the score is the mean, the label "
                          "the majority's (default 1; more need --temperature above 0)."),
        click.option("--temperature", type=float, help="Sampling temperature of the reasoning, 0 to 2 (default 0: greedy, the reference's)."),
        click.option("--top-p", type=float, help="Sample the reasoning's tokens from this share of the probability (default 1)."),
        click.option("--max-num-seqs", type=int, help="Most sequences in one engine step (default: vLLM's)."),
        click.option("--max-num-batched-tokens", type=int, help="Most tokens in one engine step (default: vLLM's)."),
        click.option("--engine-arg", "engine_args", multiple=True, metavar="KEY=JSON",
                     help="Extra vLLM engine argument; repeatable."),
        click.option("--threshold", type=float, help="Score at or above which the label is true."),
        click.option("--grades", metavar="A,B,C",
                     help="Three cut points of the score in [0, 1], increasing: each pair also gets a grade, 0 to 3, "
                          "the number of cut points at or below its score."),
        click.option("--aggregate", type=click.Choice(AGGREGATES),
                     help="How a pair's samples become its label and grade: `mean` (default), the label most samples "
                          "give (a tie to the mean P(true)'s side) and the grade of the mean P(true); `mode`, the most "
                          "common of the samples' own labels and grades, a tie going to the lower."),
        click.option("--task-template", help="Template with FILL_QUERY_HERE wrapping each query."),
        click.option("--scorer", type=click.Choice(SCORERS),
                     help="`rank1` reasons, then answers (default); `cross-encoder` reads each pair once through a "
                          "sequence-classification model (`--model tiny-cross-encoder` is the bundled toy)."),
        click.option("--cross-encoder-template", type=click.Choice(list(TEMPLATES)),
                     help="The cross-encoder's input and score: `pair` (bge, mxbai, Qwen3 rerankers; sigmoid, the "
                          "default) or `rankllama` (raw logit)."),
    ]
    return _with_options(command, options)


def run_options(command):
    options = [
        click.option("--input", "input", multiple=True, help="Parquet file, directory or glob (any fsspec URL); repeatable."),
        click.option("--output", help="Output URL (any fsspec URL)."),
        click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML job spec."),
        click.option("--column", "columns", multiple=True, metavar="CONTRACT=SOURCE",
                     help="Map an input column onto the contract, e.g. text=passage; repeatable."),
        click.option("--top-k", type=int, help="Rerank each query's k best candidates by first-stage rank."),
        click.option("--traces/--no-traces", "write_traces", default=None, help="Write reasoning traces."),
        click.option("--labels/--no-labels", default=None, help="Write relevance labels to labels/."),
        click.option("--answered-only/--all-outcomes", "labels_answered_only", default=None,
                     help="Leave out of labels/ the pairs whose outcome is not `answered`."),
        click.option("--trec-run/--no-trec-run", default=None, help="Write run.trec."),
        click.option("--run-tag", help="Tag in run.trec."),
        click.option("--store", help="Score store URL (any fsspec URL): reuse the judgements stored there and "
                                     "add this run's; created when missing."),
        click.option("--compact/--no-compact", default=None,
                     help="At the end, merge the run's part files (one per batch) into files of a few hundred MB."),
        click.option("--cascade-model",
                     help="A cross-encoder in front of Rank1: it scores each query's candidates first, and Rank1 "
                          "judges the --top-k best of its order."),
        click.option("--cascade-template", type=click.Choice(list(TEMPLATES)), help="The cascade's cross-encoder template (default pair)."),
        click.option("--cascade-top-k", type=int, help="Candidates per query, by first-stage rank, the cascade's cross-encoder scores (default: all)."),
        click.option("--cascade-dtype", help="The cascade's cross-encoder weights dtype (default: --dtype)."),
        click.option("--cascade-max-model-len", type=int, help="The cascade's cross-encoder context (default: the model's own)."),
        click.option("--engines", type=int, help="Number of engines (actors)."),
        click.option("--min-engines", type=int, help="Autoscaling: fewest engines."),
        click.option("--max-engines", type=int, help="Autoscaling: most engines."),
        click.option("--cpus-per-engine", type=float),
        click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), help="Where engines run."),
        click.option("--batch-size", type=int, help="Pairs per batch, committed as one unit."),
        click.option("--max-concurrent-batches", type=int,
                     help="Batches each engine holds at once, so its slots never wait on a batch's last pairs (default 8)."),
        click.option("--ray-address", help="Join this Ray cluster (default: RAY_ADDRESS, else a local Ray of the run's own)."),
        click.option("--placement-timeout", type=float, help="Seconds an engine may wait to be placed (default 600)."),
        click.option("--stall-timeout", type=float, help="Seconds without a committed batch before the run fails (default 1800)."),
        click.option("--grace-period", type=float,
                     help="Seconds after SIGTERM for the batches in flight to commit before the run exits (default 25)."),
        click.option("--lease-timeout", type=float,
                     help="Seconds after the last heartbeat of the run holding the output when it counts as dead "
                          "and is taken over (default 120)."),
        click.option("--max-failed-share", type=float,
                     help="Share of the pairs to rerank (within --top-k) rejected or fallen back above which the run "
                          "exits non-zero (default 0.05)."),
        *S3_OPTIONS,
        click.option("--overwrite/--no-overwrite", default=None, help="Replace an output made with another configuration."),
        click.option("--verbose/--quiet", default=None, help="Show Ray and vLLM logs."),
    ]
    return _with_options(command, options)


def job_config(config_path: str | None, given: dict) -> JobConfig:
    """YAML options first, then the command line's (only those given)."""
    options = load_options(config_path) if config_path else {}
    for key in ("input", "columns", "engine_args"):
        if not given.get(key):
            given.pop(key, None)
    if "columns" in given:
        given["columns"] = {**options.get("columns", {}), **_pairs(given["columns"], "--column", str)}
    if "engine_args" in given:
        given["engine_args"] = {**options.get("engine_args", {}), **_pairs(given["engine_args"], "--engine-arg", json.loads)}
    given = {key: value for key, value in given.items() if value is not None}
    # A pool given on the command line replaces the job spec's, whichever kind either is.
    if given.keys() & set(POOL_OPTIONS):
        for key in POOL_OPTIONS:
            options.pop(key, None)
    options.update(given)
    try:
        return JobConfig.from_options(options)
    except (TypeError, ValueError) as error:
        raise click.UsageError(str(error)) from None


def _pairs(items: tuple[str, ...], option: str, parse) -> dict:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint=option)
        try:
            pairs[key] = parse(value)
        except ValueError:
            pairs[key] = value
    return pairs


@run_options
@engine_options
def _run_parameters(**given):
    """Only carries the options, for code that needs them as click parameters."""


# Every option of `run`, as click parameters (used to spell a run back as a command line).
RUN_PARAMETERS = _run_parameters.__click_params__
