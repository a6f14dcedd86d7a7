"""The command line: parses options into one JobConfig and hands it on."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .checkpoint import ConfigurationChanged
from .config import JobConfig, load_options
from .evaluate import eval_command
from .prepare import prepare_command
from .report import report_command
from .schema import InputError
from .stages import EngineStartError

SAMPLE = Path(__file__).parent / "assets" / "sample"
# Errors whose own message says what is wrong and where.
JOB_ERRORS = (InputError, ConfigurationChanged, EngineStartError, FileNotFoundError)


def engine_options(command):
    """Options that shape the engine and the prompt, shared by every command that scores."""
    options = [
        click.option("--model", help="`tiny` (bundled), a Hugging Face id, or a local or remote path."),
        click.option("--revision", help="Model revision (branch, tag or commit)."),
        click.option("--dtype", help="Weights dtype: auto, float16, bfloat16, float32."),
        click.option("--max-model-len", type=int, help="Context length; prompts are fitted to it."),
        click.option("--max-reasoning-tokens", type=int, help="Budget of generated tokens per pair."),
        click.option("--tensor-parallel-size", type=int, help="GPUs per engine."),
        click.option("--gpu-memory-utilization", type=float, help="Share of GPU memory for vLLM."),
        click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=None),
        click.option("--enforce-eager/--no-enforce-eager", default=None, help="Skip graph compilation."),
        click.option("--quantization", help="vLLM quantization method, e.g. awq."),
        click.option("--trust-remote-code/--no-trust-remote-code", default=None),
        click.option("--seed", type=int),
        click.option("--engine-arg", "engine_args", multiple=True, metavar="KEY=JSON",
                     help="Extra vLLM engine argument; repeatable."),
        click.option("--threshold", type=float, help="Score at or above which the label is true."),
        click.option("--task-template", help="Template with FILL_QUERY_HERE wrapping each query."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


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
        click.option("--engines", type=int, help="Number of engines (actors)."),
        click.option("--min-engines", type=int, help="Autoscaling: fewest engines."),
        click.option("--max-engines", type=int, help="Autoscaling: most engines."),
        click.option("--cpus-per-engine", type=float),
        click.option("--device", type=click.Choice(["auto", "gpu", "cpu"]), help="Where engines run."),
        click.option("--batch-size", type=int, help="Pairs per engine call."),
        click.option("--ray-address", help="Join this Ray cluster instead of starting a local one."),
        click.option("--s3-endpoint-url", help="S3 endpoint (credentials come from the AWS environment)."),
        click.option("--s3-profile", help="AWS profile for S3."),
        click.option("--overwrite/--no-overwrite", default=None, help="Replace an output made with another configuration."),
        click.option("--verbose/--quiet", default=None, help="Show Ray and vLLM logs."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


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
    options.update({key: value for key, value in given.items() if value is not None})
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


@click.group()
@click.version_option(package_name="rank1-batch")
def main():
    """Rerank query-candidate pairs with Rank1 reasoning rerankers on Ray Data and vLLM."""


@main.command()
@run_options
@engine_options
def run(config_path, **given):
    """Score, rank and write every pair of --input under --output."""
    from .pipeline import run as run_job

    job = job_config(config_path, given)
    if not job.run.input or not job.run.output:
        raise click.UsageError("--input and --output are required (on the command line or in --config)")
    manifest = report_errors(run_job, job)
    click.echo(summary_line(manifest, job.run.output))


def report_errors(function, *arguments):
    """Run, turning a failure into one clear message rather than Ray's wrapped tracebacks."""
    try:
        return function(*arguments)
    except Exception as error:
        raise click.ClickException(describe(error)) from error


def describe(error: BaseException) -> str:
    """The message of our own error in the chain of causes, else of the innermost cause."""
    chain = [error]
    while len(chain) < 20 and (getattr(chain[-1], "cause", None) or chain[-1].__cause__) is not None:
        chain.append(getattr(chain[-1], "cause", None) or chain[-1].__cause__)
    for cause in chain:
        if isinstance(cause, JOB_ERRORS):
            return str(cause)
    # An actor that died in its constructor reaches the driver only as text with a traceback.
    text = str(error)
    for kind in JOB_ERRORS:
        if f"{kind.__name__}: " in text:
            return text.rsplit(f"{kind.__name__}: ", 1)[1].strip()
    return f"{type(chain[-1]).__name__}: {chain[-1]}"


def summary_line(manifest: dict, output: str) -> str:
    counts = manifest["counts"]
    outcomes = ", ".join(f"{name} {count}" for name, count in counts["outcomes"].items())
    return (
        f"{counts['scored']} pairs scored ({outcomes}), {counts['rejected']} rejected, "
        f"{counts['unscored']} beyond top-k, {counts['truncated']} truncated; "
        f"{manifest['pairs_per_second']} pairs/s over {manifest['wall_seconds']} s -> {output}"
    )


@main.command()
@click.argument("output", required=False, default="demo-output")
def demo(output):
    """Run the whole pipeline on the bundled sample with the bundled tiny model."""
    from .pipeline import run as run_job

    job = JobConfig.from_options(
        {
            "input": [str(SAMPLE)],
            "output": str(Path(output).resolve()),
            "overwrite": True,
            "model": "tiny",
            "dtype": "bfloat16",
            "max_model_len": 2048,
            "max_reasoning_tokens": 256,
            "enforce_eager": True,
        }
    )
    manifest = report_errors(run_job, job)
    click.echo(summary_line(manifest, job.run.output))
    click.echo(
        f"\nOutputs under {job.run.output}: scores/, traces/, ranked/, run.trec, _manifest.json\n"
        "Look at them with, for example:\n"
        f"  python -c \"import pyarrow.parquet as pq; print(pq.read_table('{job.run.output}/ranked').to_pandas().head(20))\"\n"
        f"  head {job.run.output}/run.trec"
    )


@main.command("trec-run")
@click.argument("output")
@click.option("--tag", default="rank1", show_default=True, help="Run tag (last column).")
@click.option("--to", "target", type=click.File("w"), default="-", help="File to write (default: stdout).")
def trec_run_command(output, tag, target):
    """Write the TREC run of a finished run's ranked/ (also written as run.trec by `run`)."""
    from .config import RunConfig
    from .outputs import trec_run
    from .schema import RANKED_SCHEMA
    from .storage import Output

    ranked = Output(output, RunConfig()).read("ranked", RANKED_SCHEMA.names, RANKED_SCHEMA)
    if not ranked.num_rows:
        raise click.UsageError(f"{output}: no ranked/ to export (is it a finished rank1-batch output?)")
    target.write(trec_run(ranked, tag))


main.add_command(prepare_command)
main.add_command(report_command)
main.add_command(eval_command)


if __name__ == "__main__":
    sys.exit(main())
